"""Bounded outputs (``num_max_recv_tokens``), run inside each rank: one rank receives every token,
the others fewer; a capacity one row short of its rows must make every rank raise
``RecvOverflowError`` naming it, and the buffer must work again after ``clear_overflow()`` (the
symmetric heap) or at once (``alltoall``). On GPUs also inside a CUDA graph: the device flag tells
that a replay overflowed.

The combine check needs no reference: each rank's expert output is its received rows unchanged,
so every token comes back as ``x`` times the number of rows it became (its ranks, or with
``do_expand`` its experts), summed in fp32 and rounded once: exact.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..buffer import ElasticBuffer
from ..errors import OP_RECV_OVERFLOW, RecvOverflowError


def inputs(rank: int, num_ranks: int, n: int, hidden: int, num_experts: int, k: int, seed: int, device):
    """``(x [n, hidden] bf16, topk [n, k] int64)``: every token's first expert is rank 1's first
    expert (rank 1 receives every token), its other experts random and distinct."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(n, hidden, generator=g).to(torch.bfloat16)
    first = num_experts // num_ranks
    others = torch.rand(n, num_experts - 1, generator=g).topk(k - 1, dim=1).indices
    topk = torch.cat([torch.full((n, 1), first), (first + 1 + others) % num_experts], dim=1)
    return x.to(device), topk.to(device)


def expected_combine(x, topk, num_ranks: int, num_experts: int, expand: bool) -> torch.Tensor:
    """What combining each rank's received rows unchanged gives (see the module docstring)."""
    n, k = topk.shape
    ranks = torch.zeros(n, num_ranks, dtype=torch.bool, device=topk.device)
    ranks.scatter_(1, topk // (num_experts // num_ranks), True)
    copies = torch.full((n,), k, device=topk.device) if expand else ranks.sum(1)
    return (x.float() * copies[:, None]).to(torch.bfloat16)


def _rows_needed(buf: ElasticBuffer, x, topk, E: int, expand: bool) -> list:
    """Every rank's output rows, from a synced dispatch of the same routing."""
    _, _, _, h, _ = buf.dispatch(x, topk_idx=topk, num_experts=E, do_expand=expand)
    need = torch.tensor([h.num_expanded_tokens if expand else h.num_recv_tokens], dtype=torch.int64, device=x.device)
    out = [torch.zeros_like(need) for _ in range(buf.num_ranks)]
    dist.all_gather(out, need, group=buf.group)
    return [int(t) for t in out]


def run_overflow_check(buf: ElasticBuffer, num_tokens: int, hidden: int, expand: bool, seed: int = 7) -> dict:
    """The eager check (see the module docstring); raises AssertionError on any failure."""
    R = buf.num_ranks
    E, k = 2 * R, 2
    x, topk = inputs(buf.rank_idx, R, num_tokens, hidden, E, k, seed, buf.device)
    needs = _rows_needed(buf, x, topk, E, expand)
    worst = max(needs)
    assert needs.index(worst) == 1, needs
    kw = dict(topk_idx=topk, num_experts=E, do_cpu_sync=False, do_expand=expand)
    raised, seq = [], None
    try:
        buf.dispatch(x, num_max_recv_tokens=worst - 1, **kw)
        # queued on a GPU: the kernels record it, the host learns it at a later call
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)
        buf.dispatch(x, num_max_recv_tokens=worst - 1, **kw)
    except RecvOverflowError as e:
        raised.append((e.peer, e.rows))
        seq = e.seq
    assert raised == [(1, worst)], raised
    if seq is not None:  # recorded by the kernels: the buffer does nothing until clear_overflow()
        assert int(buf.get_error_flag()[0]) == OP_RECV_OVERFLOW and buf.has_failed()
        try:
            buf.dispatch(x, topk_idx=topk, num_experts=E)
            raise AssertionError("a synced dispatch after the overflow did not raise")
        except RecvOverflowError:
            pass
        buf.clear_overflow()
        assert int(buf.get_error_flag()[0]) == 0 and not buf.has_failed()
    else:  # raised by the call itself (the host knew the counts): nothing stopped
        assert buf.get_error_flag() is None or int(buf.get_error_flag()[0]) == 0
    recv, _, _, h, _ = buf.dispatch(x, num_max_recv_tokens=worst, **kw)
    rows = h.num_expanded_tokens if expand else h.num_recv_tokens
    assert recv.shape[0] == rows == worst, (recv.shape, rows, worst)
    out, _, _ = buf.combine(recv, h)  # (rows past the received ones are never read)
    want = expected_combine(x, topk, R, E, expand)
    assert torch.equal(out, want), f"combine after the overflow: {int((out != want).sum())} elements differ"
    return {"rows": worst, "worst_case": R * num_tokens}


def run_graph_overflow_check(buf: ElasticBuffer, num_tokens: int, hidden: int, seed: int = 9) -> dict:
    """A capped no-sync dispatch and its combine captured in a CUDA graph: replays whose routing fits
    are exact; a replay whose routing overflows sets the device flag on every rank (nothing hangs,
    the results are not trusted); after ``clear_overflow()`` the graph replays exactly again."""
    from .graph_check import capture_graph

    R, dev = buf.num_ranks, buf.device
    E, k = 2 * R, 2
    x, topk = inputs(buf.rank_idx, R, num_tokens, hidden, E, k, seed, dev)
    g = torch.Generator().manual_seed(seed * 100 + 50 + buf.rank_idx)
    fits = torch.rand(num_tokens, E, generator=g).topk(k, dim=1).indices.to(dev)  # (uniform routing)
    cap = max(_rows_needed(buf, x, fits, E, False))
    assert cap < max(_rows_needed(buf, x, topk, E, False))
    x_in, topk_in = x.clone(), fits.clone()

    def body():
        recv, _, _, h, _ = buf.dispatch(x_in, topk_idx=topk_in, num_experts=E, do_cpu_sync=False,
                                        num_max_recv_tokens=cap)
        out, _, _ = buf.combine(recv, h)
        return out

    graph, out = capture_graph(body)
    flag = buf.get_error_flag()
    checked = 0
    for routing, overflows in ((fits, False), (topk, True), (fits, False)):
        topk_in.copy_(routing)
        graph.replay()
        torch.cuda.synchronize(dev)
        assert int(flag[0]) == (OP_RECV_OVERFLOW if overflows else 0), (int(flag[0]), overflows)
        if overflows:
            buf.clear_overflow()
        else:
            want = expected_combine(x, routing, R, E, False)
            assert torch.equal(out, want), f"graph replay: {int((out != want).sum())} elements differ"
            checked += 1
    return {"exact_replays": checked}


def run_ll_overflow_check(buf, T: int, hidden: int, seed: int = 11) -> dict:
    """V1's low-latency dispatch with ``num_max_recv_tokens_per_expert`` (``buf``: a ``Buffer`` in
    low-latency mode): rank 1's first expert gets every rank's ``T`` tokens; a bound below that
    makes every rank raise ``RecvOverflowError`` naming rank 1 (in the call on CPU ranks, at the next
    call on GPUs, the device flag set there), and after ``clear_overflow()`` the tight bound gives
    exact results again. Weights 1: each token combines to ``k`` times itself, exact."""
    R, dev = buf.group_size, buf._ll.device
    E, k = 2 * R, 2
    x, topk = inputs(buf.rank, R, T, hidden, E, k, seed, dev)
    w = torch.ones(T, k, dtype=torch.float32, device=dev)
    need = R * T
    short = (need - 1) // 4 * 4
    raised, seq = [], None
    try:
        buf.low_latency_dispatch(x, topk, T, E, use_fp8=False, num_max_recv_tokens_per_expert=short)
        if dev.type == "cuda":  # queued: the kernels record it, the host learns it at the next call
            torch.cuda.synchronize(dev)
            assert int(buf.get_error_flag(low_latency=True)[0]) == OP_RECV_OVERFLOW
        buf.low_latency_dispatch(x, topk, T, E, use_fp8=False, num_max_recv_tokens_per_expert=short)
    except RecvOverflowError as e:
        raised.append((e.peer, e.rows))
        seq = e.seq
    assert raised == [(1, need)] and seq is not None, raised
    assert int(buf.get_error_flag(low_latency=True)[0]) == OP_RECV_OVERFLOW
    try:
        buf.low_latency_dispatch(x, topk, T, E, use_fp8=False)
        raise AssertionError("a low-latency dispatch after the overflow did not raise")
    except RecvOverflowError:
        pass
    buf.clear_overflow()
    assert int(buf.get_error_flag(low_latency=True)[0]) == 0
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, topk, T, E, use_fp8=False,
                                                         num_max_recv_tokens_per_expert=need)
    assert tuple(recv.shape) == (E // R, need, hidden), recv.shape
    out, _, _ = buf.low_latency_combine(recv, topk, w, handle)
    want = (x.float() * k).to(torch.bfloat16)
    assert torch.equal(out, want), f"combine after the overflow: {int((out != want).sum())} elements differ"
    return {"rows": need, "short": short}
