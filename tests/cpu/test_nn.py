"""tritonep.nn.MoE on spawned CPU ranks: the expert-parallel layer's forward and gradients match the
same layer computed in one process (tolerance in tritonep.testing.moe_check), eagerly and as a
compiled training step (torch.compile(fullgraph=True): no graph break)."""
import pytest

from tritonep.testing.launch import parallel_launch


def _worker(info, compile_backend, fp8):
    from tritonep import ElasticBuffer
    from tritonep.testing.moe_check import run_moe_check

    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=12, hidden=128, num_topk=3, explicitly_destroy=True)
    out = run_moe_check(buf, 12, 128, 32, 3 * info.world_size, 3, compile_backend=compile_backend, fp8_dispatch=fp8)
    buf.destroy()
    return out


@pytest.mark.parametrize("compile_backend,fp8", [(None, True), ("aot_eager", False)])
def test_moe_layer_matches_the_dense_layer(compile_backend, fp8):
    out = parallel_launch(3, _worker, compile_backend, fp8)
    assert ("compiled" in out[0]) == (compile_backend is not None)


def test_moe_arguments():
    from tritonep.nn import MoE

    with pytest.raises(ValueError, match="score_func"):
        MoE(None, 64, 32, 4, 2, score_func="relu")
    with pytest.raises(ValueError, match="top_k"):
        MoE(None, 64, 32, 4, 5)
