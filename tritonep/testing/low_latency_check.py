"""Checks of V1's low-latency dispatch and combine against the reference, bit for bit, shared by the
CPU and GPU tests."""
from __future__ import annotations

import dataclasses

import torch

from .. import reference
from .ep_check import assert_bitwise_equal
from .gate import combine_input, make_inputs


@dataclasses.dataclass
class LLCase:
    seed: int
    num_tokens: list  # per rank, each <= T
    T: int
    hidden: int
    num_experts: int
    num_topk: int
    masked_ratio: float = 0.0
    use_fp8: bool = False
    round_scale: bool = False
    use_ue8m0: bool = False
    hook: bool = False
    zero_copy: bool = False
    async_mode: bool = False
    wait_stats: bool = False  # also pass both wait-time counters
    repeat: bool = False  # every other row names its first expert twice (V1 does not forbid it)
    cap: int | None = None  # num_max_recv_tokens_per_expert; "tight": the fewest (a multiple of 4) that fit


def _inputs(case: LLCase, s: int):
    x, topk, w = make_inputs(case.seed, s, case.num_tokens[s], case.hidden, case.num_experts, case.num_topk,
                             masked_ratio=case.masked_ratio)
    if case.repeat:
        topk[::2, -1] = topk[::2, 0]
    return x, topk, w


def expected(case: LLCase, R: int):
    """Every rank's reference dispatch, its expert outputs and weights."""
    ins = [_inputs(case, s) for s in range(R)]
    refs = [reference.low_latency_dispatch(d, [i[0] for i in ins], [i[1] for i in ins], case.num_experts,
                                           case.use_fp8, case.round_scale) for d in range(R)]
    ys = [[combine_input(x.float().to(torch.bfloat16), d) for x in refs[d].recv_x] for d in range(R)]
    return ins, refs, ys


def cap_rows(case: LLCase, refs) -> int | None:
    """The rows per expert ``case`` asks for (``"tight"``: the most any expert of any rank gets,
    rounded up to 4)."""
    if case.cap != "tight":
        return case.cap
    most = max(int(ref.recv_count.max()) if ref.recv_count.numel() else 0 for ref in refs)
    return max(4, -(-most // 4) * 4)


def check_dispatch(case: LLCase, rank: int, R: int, out, recv_count, handle, refs, where: str) -> None:
    ref = refs[rank]
    src_info, layout_range, T, H, E = handle
    assert (T, H, E) == (case.T, case.hidden, case.num_experts)
    assert_bitwise_equal("recv_count", recv_count.long(), ref.recv_count, where)
    assert_bitwise_equal("layout_range", layout_range, ref.layout_range, where)
    recv_x, recv_sf = out if case.use_fp8 else (out, None)
    L = E // R
    assert tuple(recv_x.shape) == (L, min(cap_rows(case, refs) or R * T, R * T), H), (where, recv_x.shape)
    for lo in range(L):
        c = int(ref.recv_count[lo])
        assert_bitwise_equal(f"recv_x[{lo}]", recv_x[lo, :c], ref.recv_x[lo], where)
        assert_bitwise_equal(f"src_info[{lo}]", src_info[lo, :c].long(), ref.src_info[lo], where)
        if case.use_fp8:
            want = reference.ue8m0(ref.recv_sf[lo]) if case.use_ue8m0 else ref.recv_sf[lo]
            assert recv_sf.stride(1) == 1, where + "scales must be column-major"
            assert_bitwise_equal(f"scales[{lo}]", recv_sf[lo, :c], want, where)


def run_ll_case(buf, case: LLCase, stats=None) -> dict:
    """A low-latency dispatch and combine of ``case`` on ``buf``, checked against the reference."""
    R, r = buf.group_size, buf.rank
    dev = buf._ll.device
    where = f"[rank {r}/{R} {case}] "
    ins, refs, ys = expected(case, R)
    x, topk, w = (t.to(dev) for t in ins[r])
    kw = dict(use_fp8=case.use_fp8, round_scale=case.round_scale, use_ue8m0=case.use_ue8m0,
              async_finish=case.async_mode, return_recv_hook=case.hook)
    before = stats.clone() if stats is not None else None
    waits = [torch.zeros(R, dtype=torch.int64, device=dev) for _ in range(2)] if case.wait_stats else [None, None]
    out, recv_count, handle, event, hook = buf.low_latency_dispatch(
        x, topk, case.T, case.num_experts, cumulative_local_expert_recv_stats=stats,
        dispatch_wait_recv_cost_stats=waits[0], num_max_recv_tokens_per_expert=cap_rows(case, refs), **kw)
    if case.hook:
        hook()
    if case.async_mode:
        event.current_stream_wait()
    check_dispatch(case, r, R, out, recv_count, handle, refs, where)
    if stats is not None:
        assert_bitwise_equal("cumulative stats", stats.long().cpu(), before.long().cpu() + refs[r].recv_count, where)
    # combine: this rank's outputs for its rows, in the packed layout
    L = case.num_experts // R
    y = (buf.get_next_low_latency_combine_buffer(handle) if case.zero_copy else
         torch.full((L, handle.rows, case.hidden), float("nan"), dtype=torch.bfloat16, device=dev))
    for lo in range(L):
        y[lo, :len(ys[r][lo])] = ys[r][lo].to(dev)
    combined, event, hook = buf.low_latency_combine(y, topk, w, handle, zero_copy=case.zero_copy,
                                                    async_finish=case.async_mode, return_recv_hook=case.hook,
                                                    combine_wait_recv_cost_stats=waits[1])
    if case.hook:
        hook()
    if case.async_mode:
        event.current_stream_wait()
    want = reference.low_latency_combine(r, ys, refs, ins[r][1], ins[r][2], case.num_experts)
    assert_bitwise_equal("combined_x", combined, want, where)
    if case.wait_stats:  # nanoseconds waited per source rank: counted, never negative
        assert all(bool((wt >= 0).all()) for wt in waits), where + f"wait times {waits}"
    return dict(rows=int(refs[r].recv_count.sum()))


def run_ll_graph(buf, case: LLCase, replays: int = 2) -> dict:
    """Dispatch, expert stand-in and combine captured in one CUDA graph (as SGLang captures a decode
    step), replayed with new inputs copied into the captured tensors; each replay checked."""
    R, r = buf.group_size, buf.rank
    dev = buf._ll.device
    T, E = case.T, case.num_experts
    ins = _inputs(case, r)
    x, topk, w = (t.to(dev).clone() for t in ins)

    def step():
        out, count, handle, _, _ = buf.low_latency_dispatch(x, topk, T, E, use_fp8=case.use_fp8,
                                                            round_scale=case.round_scale, use_ue8m0=case.use_ue8m0)
        recv = out[0] if case.use_fp8 else out
        y = combine_input(recv.float().to(torch.bfloat16), r)  # elementwise: the reference's expert outputs
        combined, _, _ = buf.low_latency_combine(y, topk, w, handle)
        return out, count, handle, combined

    step()  # compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, count, handle, combined = step()
    for i in range(replays):
        new = dataclasses.replace(case, seed=case.seed + 1000 * (i + 1))
        ins_all, refs, ys = expected(new, R)
        for dst, src in zip((x, topk, w), ins_all[r]):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        where = f"[rank {r}/{R} graph replay {i} {new}] "
        check_dispatch(new, r, R, out, count, handle, refs, where)
        want = reference.low_latency_combine(r, ys, refs, ins_all[r][1], ins_all[r][2], E)
        assert_bitwise_equal("combined_x", combined, want, where)
    return dict(replays=replays)


def run_shrink_case(group, T: int = 8, H: int = 512) -> str:
    """Shrink mode: the last rank builds its buffer and then never calls. The others, with it
    masked beforehand and then with it masked by a wait that timed out (set
    ``TRITONEP_GPU_TIMEOUT_SECS`` small), finish as if it had no tokens and no experts.

    The silent rank's process stays up until the others are done (a barrier at the end), so that
    its memory, which the others' kernels reach through CUDA IPC where ranks share one GPU, stays
    mapped while they run. (On ranks sharing one H100 the "timed out" case has still failed now
    and then with rows of the rank's own tokens reading zero: not yet explained, see README's
    limits; a failure says whether a second check after a device synchronize passes.)"""
    import torch.distributed as dist

    from tritonep import Buffer

    R, r = dist.get_world_size(group), dist.get_rank(group)
    dead, E = R - 1, 2 * R
    L = E // R
    buf = Buffer(group, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                 enable_shrink=True)
    if r == dead:
        dist.barrier(group)
        return "dead"
    dev = buf._ll.device
    status = torch.zeros(R, dtype=torch.int32, device=dev)
    for how in ("masked", "timed out"):
        buf.low_latency_clean_mask_buffer()
        if how == "masked":
            buf.low_latency_update_mask_buffer(dead, True)
        case = LLCase(80 + len(how), [T] * R, T, H, E, 3)
        ins = [_inputs(case, s) for s in range(R)]
        x, topk, w = (t.to(dev) for t in ins[r])
        # what the others see: nothing from the dead rank, nothing to its experts
        alive = [(i[0][:0] if s == dead else i[0],
                  i[1][:0] if s == dead else torch.where(i[1] // L == dead, -1, i[1])) for s, i in enumerate(ins)]
        refs = [reference.low_latency_dispatch(d, [a[0] for a in alive], [a[1] for a in alive], E) for d in range(R)]
        recv, count, handle, _, _ = buf.low_latency_dispatch(x, topk, T, E, use_fp8=False)
        where = f"[rank {r} shrink, dead rank {how}] "
        try:
            check_dispatch(case, r, R, recv, count, handle, refs, where)
        except AssertionError as e:  # a read that saw what the memory no longer holds, or wrong rows?
            if dev.type == "cuda":
                torch.cuda.synchronize()
            try:
                check_dispatch(case, r, R, recv, count, handle, refs, where)
                again = "passes"
            except AssertionError as e2:
                again = "fails the same" if str(e2) == str(e) else f"fails otherwise: {e2}"
            raise AssertionError(f"{e} | checked again after a device synchronize: {again}") from None
        buf.low_latency_query_mask_buffer(status)
        assert status.tolist() == [int(s == dead) for s in range(R)], status
        ys = [[combine_input(rx, d) for rx in refs[d].recv_x] for d in range(R)]
        y = torch.zeros((L, R * T, H), dtype=torch.bfloat16, device=dev)
        for lo in range(L):
            y[lo, :len(ys[r][lo])] = ys[r][lo].to(dev)
        out, _, _ = buf.low_latency_combine(y, topk, w, handle)
        want = reference.low_latency_combine(r, ys, refs, alive[r][1], ins[r][2], E)
        assert_bitwise_equal("combined_x without the dead rank", out, want, f"[rank {r} {how}] ")
    dist.barrier(group)
    return "survived"
