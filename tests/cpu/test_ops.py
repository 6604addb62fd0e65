"""tritonep.ops on spawned CPU ranks: the custom operators' forward and gradients bit-exact against
the reference (normal and expanded layouts, weights, bias), and torch.compile(fullgraph=True)
tracing a training step through them (no graph break) with the same results bit for bit."""
import pytest

from tritonep.testing.launch import parallel_launch

T = 12


def _worker(info, compile_backend):
    import torch

    from tritonep import ElasticBuffer
    from tritonep.testing.ops_check import OpsCase, run_ops_case, step

    R = info.world_size
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=256, num_topk=4, explicitly_destroy=True)
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend) if compile_backend else None
    cases = [OpsCase(61, [T, 7, 0][:R], 256, 4 * R, 4, masked_ratio=0.2, with_bias=True),
             OpsCase(62, [5, T, 9][:R], 256, 2 * R, 3, expand=True),
             OpsCase(63, [T] * R, 256, 4 * R, 2, expand=True, expert_alignment=4, masked_ratio=0.1, fp8=True),
             OpsCase(64, [T, 3, T][:R], 256, 2 * R, 2, fp8=True, with_bias=True)]
    out = [run_ops_case(buf, case, compiled) for case in cases]
    buf.destroy()
    return out


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
def test_ops_forward_and_gradients_are_exact(compile_backend):
    parallel_launch(3, _worker, compile_backend)


def _ll_worker(info, compile_backend):
    import torch

    from tritonep import Buffer
    from tritonep.testing.low_latency_check import LLCase
    from tritonep.testing.ops_check import low_latency_step, run_low_latency_ops_case

    R, TL, H = info.world_size, 8, 512
    buf = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(TL, H, R, 4 * R), low_latency_mode=True,
                 explicitly_destroy=True)
    compiled = torch.compile(low_latency_step, fullgraph=True, backend=compile_backend) if compile_backend else None
    out = [run_low_latency_ops_case(buf, case, compiled) for case in (
        LLCase(81, [TL, 5][:R], TL, H, 4 * R, 3, masked_ratio=0.2),
        LLCase(82, [TL] * R, TL, H, 4 * R, 2, use_fp8=True, round_scale=True, use_ue8m0=True, cap="tight"))]
    buf.destroy()
    return out


def test_low_latency_ops_are_exact_eager_and_compiled():
    """V1's low-latency pair as operators: bit-exact against the reference, and the same decode step
    under torch.compile(fullgraph=True) too."""
    parallel_launch(2, _ll_worker, "aot_eager")
