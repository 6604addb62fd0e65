"""CUDA-graph checks, run inside each rank (GPUs only): dispatch, an "expert" and combine captured
once, then replayed with new inputs copied into the captured tensors, bit-exact against
:mod:`tritonep.reference` on every replay.

Two graphs, the two ways a serving engine captures an MoE layer:

* ``cached``: dispatch with the handle of an eager dispatch (same routing, new data), then combine;
* ``fresh``: dispatch with ``do_cpu_sync=False`` (new routing on every replay, worst-case output
  rows, the true counts on the GPU), then combine with that dispatch's handle.

Between them, eager calls on the same buffer: the operation numbers that the kernels keep on the
device must stay consistent whether a call was replayed or launched.
"""
from __future__ import annotations

import warnings

import torch

from .. import reference
from ..buffer import ElasticBuffer
from .ep_check import assert_bitwise_equal
from .gate import combine_input, make_inputs


def capture_graph(body):
    """``(graph, outputs of body)``: one eager warm-up on a side stream, then the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


def _poison(*tensors) -> None:
    for t in tensors:
        if t is not None:
            t.view(torch.uint8).fill_(0xFF)


def run_graph_checks(buf: ElasticBuffer, num_tokens: int, hidden: int, num_experts: int, num_topk: int,
                     replays: int = 3, burst: int = 8, seed: int = 500, num_sms: int = 0) -> dict:
    """Capture and replay both graphs (see the module docstring); raises AssertionError on any
    mismatch. ``burst``: replays queued back to back at the end, with no host sync between them."""
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    T, E, k = num_tokens, num_experts, num_topk

    def inputs(i: int):
        """Every rank's ``(x, topk, w)`` of step ``i`` (each rank rebuilds all of them from seeds)."""
        return [make_inputs(seed + i, s, T, hidden, E, k) for s in range(R)]

    def expected(ins):
        """This rank's reference dispatch, and its combine of every rank's ``combine_input``."""
        xs, topks, ws = (list(v) for v in zip(*ins))
        refs = [reference.dispatch(d, xs, topks, ws, E, T) for d in range(R)]
        ys = [combine_input(refs[d].recv_x, d) for d in range(R)]
        out, out_w = reference.combine(r, ys, [d.recv_src_idx for d in refs], topks[r], E, T,
                                       [d.recv_topk_weights for d in refs])
        return refs[r], (out, out_w)

    def check(tag, ref, ref_out, outs, M):
        rx, rtopk, rw, out, out_w = outs
        want_out, want_w = ref_out
        where = f"[rank {r}/{R} graph {tag}] "
        assert_bitwise_equal("recv_x", rx[:M], ref.recv_x, where)
        assert_bitwise_equal("recv_topk_idx", rtopk[:M], ref.recv_topk_idx, where)
        assert_bitwise_equal("recv_topk_weights", rw[:M], ref.recv_topk_weights, where)
        assert_bitwise_equal("combined_x", out, want_out, where)
        assert_bitwise_equal("combined_topk_weights", out_w, want_w, where)

    # --- cached: routing of step 0 fixed by an eager dispatch, data and weights new every replay
    ins0 = inputs(0)
    x0, topk0, w0 = (t.to(dev) for t in ins0[r])
    _, _, _, handle, _ = buf.dispatch(x0, topk_idx=topk0, topk_weights=w0, num_experts=E, num_max_tokens_per_rank=T,
                                      num_sms=num_sms)
    # the captured inputs must outlive the graph: torch.cuda.graph() empties the allocator's cache
    # before a capture, so a freed input's memory can be unmapped under a later replay
    cx_in, cw_in = x0.clone(), w0.clone()

    def cached_body():
        rx, rtopk, rw, _, _ = buf.dispatch(cx_in, handle=handle, topk_weights=cw_in, num_sms=num_sms)
        out, out_w, _ = buf.combine(combine_input(rx, r), handle, topk_weights=rw, num_sms=num_sms)
        return rx, rtopk, rw, out, out_w

    graph, outs = capture_graph(cached_body)
    M = handle.num_recv_tokens
    for i in range(1, replays + 1):
        step = inputs(i)
        ins = [(x, topk, w) for (x, _, w), (_, topk, _) in zip(step, ins0)]  # same routing, new data
        cx_in.copy_(ins[r][0])
        cw_in.copy_(ins[r][2])
        _poison(*outs)
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_out = expected(ins)
        check(f"cached, replay {i}", ref, ref_out, outs, M)

    # --- fresh: routing new every replay, no host sync inside the graph
    x_in, topk_in, w_in = (t.clone() for t in (x0, topk0, w0))
    state = {}

    def fresh_body():
        rx, rtopk, rw, h, _ = buf.dispatch(x_in, topk_idx=topk_in, topk_weights=w_in, num_experts=E,
                                           num_max_tokens_per_rank=T, do_cpu_sync=False, num_sms=num_sms)
        out, out_w, _ = buf.combine(combine_input(rx, r), h, topk_weights=rw, num_sms=num_sms)
        state["handle"] = h
        return rx, rtopk, rw, out, out_w

    graph2, outs2 = capture_graph(fresh_body)
    h = state["handle"]
    assert h.num_recv_tokens == R * T, "without a CPU sync the outputs have the worst-case rows"
    for i in range(replays + 1, 2 * replays + 1):
        ins = inputs(i)
        for dst, src in zip((x_in, topk_in, w_in), ins[r]):
            dst.copy_(src)
        _poison(*outs2)
        graph2.replay()
        torch.cuda.synchronize()
        ref, ref_out = expected(ins)
        M = int(h.psum_num_recv_tokens_per_scaleup_rank[-1])
        assert M == ref.recv_x.shape[0], f"[rank {r}] replay {i}: {M} rows announced, reference {ref.recv_x.shape[0]}"
        check(f"fresh, replay {i}", ref, ref_out, outs2, M)
        # an eager cached dispatch between replays: it takes the next number after the replay's
        rx2, _, _, _, _ = buf.dispatch(x_in, handle=h, topk_weights=w_in, num_sms=num_sms)
        assert_bitwise_equal("eager cached recv_x after a replay", rx2[:M], ref.recv_x, f"[rank {r}] ")

    # --- a burst of replays queued back to back, then the graphs' results once more
    _poison(*outs2)
    for _ in range(burst):
        graph2.replay()
        graph.replay()
    torch.cuda.synchronize()
    check("fresh, after a burst", ref, ref_out, outs2, int(h.psum_num_recv_tokens_per_scaleup_rank[-1]))
    buf.barrier(with_cpu_sync=True)  # also raises any timeout a kernel recorded
    return {"replays": 2 * replays + 2 * burst, "rows": M}


def check_capture_refusals(sym: ElasticBuffer, a2a: ElasticBuffer, num_tokens: int, hidden: int, num_experts: int,
                           num_topk: int, seed: int = 900) -> None:
    """What cannot be captured raises ``ValueError`` inside the capture, before any kernel: a
    dispatch with ``do_cpu_sync=True`` (symmetric backend) and any call of the all-to-all backend.
    Then both buffers still dispatch and combine bit-exactly (eagerly)."""
    import pytest

    R, r, dev = sym.num_ranks, sym.rank_idx, sym.device
    ins = [make_inputs(seed, s, num_tokens, hidden, num_experts, num_topk) for s in range(R)]
    x, topk, w = (t.to(dev) for t in ins[r])
    kw = dict(topk_idx=topk, topk_weights=w, num_experts=num_experts)
    for buf, extra in ((sym, dict(do_cpu_sync=True)), (a2a, dict(do_cpu_sync=False))):
        buf.dispatch(x, **kw, **extra)  # compiled and warm
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # the refusal comes before any kernel, so torch warns that the capture recorded nothing
        with warnings.catch_warnings(), pytest.raises(ValueError, match="CUDA graph"):
            warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
            with torch.cuda.graph(graph):
                buf.dispatch(x, **kw, **extra)
    xs, topks, ws = (list(v) for v in zip(*ins))
    ref = reference.dispatch(r, xs, topks, ws, num_experts, num_tokens)
    for buf in (sym, a2a):
        rx, _, _, handle, _ = buf.dispatch(x, **kw)
        assert_bitwise_equal("recv_x after a refused capture", rx, ref.recv_x, f"[rank {r} {buf.backend}] ")
        buf.combine(combine_input(rx, r), handle)
    torch.cuda.synchronize()


__all__ = ["capture_graph", "check_capture_refusals", "run_graph_checks"]
