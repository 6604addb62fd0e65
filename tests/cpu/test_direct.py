"""Direct mode across declared hosts (``allow_hybrid_mode=False``) on CPU ranks: rows between ranks
of one host go through that host's heap (never another host's), the rest through torch.distributed;
dispatch, combine (both reduction recipes, normal and expanded rows) and cached dispatch are
bit-exact against ``reference`` in direct mode, also when the heap is too small for one round."""
import os

import pytest

from tritonep.testing.launch import parallel_launch


def _direct_worker(info, scaleup, seed):
    os.environ["TRITONEP_SCALEUP_SIZE"] = str(scaleup)  # before the first buffer reads it
    import torch.distributed as dist

    from tritonep import ElasticBuffer, copy_engine, heap
    from tritonep.testing.ep_check import Case, random_cases, run_case

    heaps, copies = [], []
    create_heap, copy_bytes = heap.create_heap, copy_engine.copy_bytes
    heap.create_heap = lambda group, *a, **k: heaps.append(dist.get_process_group_ranks(group)) or create_heap(
        group, *a, **k)
    copy_engine.copy_bytes = lambda *a: copies.append(a[2]) or copy_bytes(*a)
    R = info.world_size
    host = info.rank // scaleup
    bufs = [ElasticBuffer(info.group, num_bytes=2 << 20, num_max_tokens_per_rank=24, allow_hybrid_mode=False,
                          allow_multiple_reduction=amr, num_gpu_timeout_secs=300) for amr in (True, False)]
    assert heaps == [list(range(host * scaleup, (host + 1) * scaleup))] * 2, heaps
    for buf in bufs:
        assert buf.backend == "direct"
        assert buf.get_logical_domain_size() == (1, R)
        assert buf.get_physical_domain_size() == (R // scaleup, scaleup)
    cases = [Case(seed=seed, num_tokens=[12 - r % 5 for r in range(R)], hidden=256, num_experts=4 * R, num_topk=8,
                  routing="skewed", masked_ratio=0.1, num_bias=2),
             Case(seed=seed + 1, num_tokens=[0] + [9] * (R - 1), hidden=128, num_experts=2 * R, num_topk=3,
                  fp8=True, cpu_sync=False, sf_col_major=True, num_bias=1)]
    cases += random_cases(seed + 10, R, 3, max_tokens=16)
    out = [run_case(bufs[i % 2], case) for i, case in enumerate(cases)]
    for buf in bufs:
        out.append(run_case(buf, Case(seed=seed + 4, num_tokens=[8] * R, hidden=128, num_experts=4 * R, num_topk=4,
                                      expand=True, expert_alignment=4, zero_padding=True, num_bias=1)))
    fp8 = ElasticBuffer(info.group, num_bytes=2 << 20, num_max_tokens_per_rank=24, use_fp8_dispatch=True,
                        allow_hybrid_mode=False)
    out.append(run_case(fp8, Case(seed=seed + 2, num_tokens=[10] * R, hidden=256, num_experts=2 * R, num_topk=2,
                                  quantize=True, round_scale=True, num_bias=1)))
    fp8.destroy()
    assert copies and all(n > 0 for n in copies)  # rows did cross the heap
    # a handle of the other mode: refused before any row moves, and both buffers keep working
    import torch

    from tritonep.testing.gate import make_inputs

    hybrid = ElasticBuffer(info.group, num_max_tokens_per_rank=24, hidden=128, num_topk=4)
    assert hybrid.backend == "hybrid"
    x, topk, _ = make_inputs(seed + 7, info.rank, 8, 128, 4 * R, 4)
    recv, _, _, handle, _ = bufs[0].dispatch(x, topk_idx=topk, num_experts=4 * R)
    with pytest.raises(ValueError, match="another ElasticBuffer"):
        hybrid.combine(recv, handle)
    with pytest.raises(ValueError, match="another ElasticBuffer"):
        hybrid.dispatch(x, handle=handle)
    y, _, _ = hybrid.combine(*hybrid.dispatch(x, topk_idx=topk, num_experts=4 * R)[::3])
    # the rows out and back: each token times its destinations (rounded at other points per mode)
    torch.testing.assert_close(y.float(), bufs[0].combine(recv, handle)[0].float(), rtol=1e-2, atol=1e-2)
    hybrid.destroy()
    # a heap region smaller than a call's rows: several rounds, the same results
    bufs[0]._backend.region_bytes = 4 << 10
    out.append(run_case(bufs[0], cases[0]))
    for buf in bufs:
        buf.destroy()
    return out


@pytest.mark.parametrize("hosts, per_host", [(2, 2), (2, 3), (4, 2)])
def test_direct_backend_is_exact(hosts, per_host):
    parallel_launch(hosts * per_host, _direct_worker, per_host, 500 + hosts * 10 + per_host)
