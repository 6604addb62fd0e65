"""V1's low-latency mode on CPU ranks: dispatch (BF16, FP8, power-of-two and UE8M0 scales) and the
weighted combine, with hooks, two outstanding operations, zero-copy combine and counters, bit-exact
against the reference; bad input refused before anything moves."""
import pytest

from tritonep.testing.launch import parallel_launch


def _ll_worker(info, seed):
    import torch

    from tritonep import Buffer
    from tritonep.testing.low_latency_check import LLCase, check_dispatch, expected, run_ll_case

    R = info.world_size
    T, H, E = 16, 512, 4 * R
    buf = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                 num_qps_per_rank=E // R, explicitly_destroy=True)
    stats = torch.zeros(E // R, dtype=torch.int32)
    cases = [LLCase(seed, [12 - r % 5 for r in range(R)], T, H, E, 4, masked_ratio=0.2),
             LLCase(seed + 1, [0] + [T] * (R - 1), T, H, E, 3, use_fp8=True, hook=True),
             LLCase(seed + 2, [9] * R, T, H, E, 4, use_fp8=True, round_scale=True, zero_copy=True),
             LLCase(seed + 3, [7] * R, T, H, E, 2, use_fp8=True, round_scale=True, use_ue8m0=True, hook=True,
                    zero_copy=True),
             LLCase(seed + 4, [T] * R, T, H, E, 1, wait_stats=True),
             LLCase(seed + 9, [11] * R, T, H, E, 3, use_fp8=True, repeat=True)]
    out = [run_ll_case(buf, case, stats) for case in cases]
    # two dispatches outstanding before either receive hook runs (two-micro-batch overlap)
    a, b = (LLCase(seed + 5 + i, [10] * R, T, H, E, 4, use_fp8=bool(i)) for i in range(2))
    sent = []
    for case in (a, b):
        ins, refs, _ = expected(case, R)
        res = buf.low_latency_dispatch(ins[info.rank][0], ins[info.rank][1], T, E, use_fp8=case.use_fp8,
                                       return_recv_hook=True)
        sent.append((case, refs, res))
    for case, refs, (recv, count, handle, _, hook) in sent:
        hook()
        check_dispatch(case, info.rank, R, recv, count, handle, refs, f"[rank {info.rank} outstanding {case}] ")
    # the buffer keeps working after a clean
    buf.clean_low_latency_buffer(T, H, E)
    out.append(run_ll_case(buf, cases[0]))
    buf.destroy()
    return out


@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
def test_low_latency_is_exact(num_ranks):
    parallel_launch(num_ranks, _ll_worker, 700 + num_ranks)


def _ll_bad_input_worker(info):
    import torch

    from tritonep import Buffer
    from tritonep.testing.gate import make_inputs

    R = info.world_size
    T, H, E = 8, 512, 2 * R
    buf = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True)
    x, topk, w = make_inputs(3, info.rank, 8, H, E, 2)
    for kwargs, err, match in [
            (dict(x=x.float()), TypeError, "bfloat16"),
            (dict(x=torch.zeros((T + 1, H), dtype=torch.bfloat16), topk_idx=torch.zeros((T + 1, 2), dtype=torch.int64)),
             ValueError, "more than"),
            (dict(use_ue8m0=True), ValueError, "round_scale"),
            (dict(async_finish=True, return_recv_hook=True), ValueError, "cannot both"),
            (dict(num_experts=E + 1), ValueError, "multiple"),
            (dict(x=torch.zeros((8, 640), dtype=torch.bfloat16)), ValueError, "512")]:
        args = dict(x=x, topk_idx=topk, num_max_dispatch_tokens_per_rank=T, num_experts=E, use_fp8=True)
        args.update(kwargs)
        with pytest.raises(err, match=match):
            buf.low_latency_dispatch(**args)
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, topk, T, E, use_fp8=False)
    with pytest.raises(NotImplementedError, match="use_logfmt"):
        buf.low_latency_combine(recv, topk, w, handle, use_logfmt=True)
    with pytest.raises(ValueError, match="must be"):
        buf.low_latency_combine(recv[:, :-1], topk, w, handle)
    with pytest.raises(ValueError, match="handle"):
        buf.low_latency_combine(recv, topk, w, (1, 2, 3, 4, 5))
    out, _, _ = buf.low_latency_combine(recv, topk, w, handle)  # still in step with the peers
    with pytest.raises(ValueError, match="enable_shrink"):
        buf.low_latency_update_mask_buffer(0, True)
    assert out.shape == x.shape
    small = Buffer(info.group, 0, 2 << 20, low_latency_mode=True)
    with pytest.raises(ValueError, match="num_rdma_bytes"):
        small.low_latency_dispatch(torch.zeros((64, 4096), dtype=torch.bfloat16),
                                   torch.zeros((64, 8), dtype=torch.int64), 64, 64 * R)
    with pytest.raises(ValueError, match="low_latency_mode"):
        Buffer(info.group, 2 << 20).low_latency_dispatch(x, topk, T, E)
    return True


def test_low_latency_bad_input():
    parallel_launch(2, _ll_bad_input_worker)


def _shrink_worker(info):
    import os

    os.environ["TRITONEP_GPU_TIMEOUT_SECS"] = "3"  # the wait for the dead rank (before the buffer reads it)
    from tritonep.testing.low_latency_check import run_shrink_case

    return run_shrink_case(info.group)


def test_shrink_mode_skips_a_dead_rank():
    """A rank that never calls: masked beforehand, or masked by the first wait for it that times
    out; the others finish with its tokens and experts left out, and never hang."""
    parallel_launch(3, _shrink_worker)
