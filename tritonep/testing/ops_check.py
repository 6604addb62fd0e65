"""Checks of :mod:`tritonep.ops` (the custom operators with autograd) against the reference, bit for
bit, run inside each rank; shared by the CPU and GPU tests.

A step: ``dispatch`` (x and topk_weights requiring grad), an "expert" that scales each rank's rows by
its own constant (``y = recv_x * c_rank``, bf16), ``combine``, and the loss
``sum(out.float() * g_out) + sum(recv_w * g_w)`` with seeded ``g_out`` / ``g_w``. Expected, every
rank's data rebuilt in each process from the seeds:

* forward: the reference dispatch (valid rows; every other row zero) and combine;
* ``y.grad`` (the gradient of combine): the reference dispatch of ``g_out`` (as bf16), rows that hold
  no token zero;
* ``x.grad`` (the gradient of dispatch): the reference combine of ``y.grad * c`` (bf16, what autograd
  makes of the multiplication) from every rank;
* ``topk_weights.grad``: the reference combine of ``g_w`` as weights (normal layout: V1's sum of
  the weight rows; expanded: each row's weight to its slot).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import ops, reference
from .ep_check import assert_bitwise_equal
from .gate import combine_input, make_inputs


@dataclasses.dataclass
class OpsCase:
    seed: int
    num_tokens: list  # per rank
    hidden: int
    num_experts: int
    num_topk: int
    expand: bool = False
    expert_alignment: int = 1
    masked_ratio: float = 0.0
    with_bias: bool = False
    fp8: bool = False  # rows travel as FP8 (the forward's rows: the reference's dequantized)


def _scale(rank: int) -> float:
    return 0.5 + 0.25 * rank


def _g_out(case: OpsCase, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.seed * 7919 + rank)
    return torch.randn(case.num_tokens[rank], case.hidden, generator=g).to(torch.bfloat16)


def _g_w(case: OpsCase, rank: int, shape: tuple) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.seed * 7907 + rank)
    return torch.randn(shape, generator=g)


def step(buf, case: OpsCase, x, topk, w, bias=None):
    """One forward: ``(recv_x, recv_w, handle, y, out)``."""
    recv_x, _, recv_w, handle = ops.dispatch(buf, x, topk, w, num_experts=case.num_experts, expand=case.expand,
                                             expert_alignment=case.expert_alignment, fp8=case.fp8)
    y = recv_x * _scale(buf.rank_idx)
    out = ops.combine(buf, y, handle, bias=bias)
    return recv_x, recv_w, handle, y, out


def loss_of(case: OpsCase, rank: int, recv_w, out) -> torch.Tensor:
    g_out = _g_out(case, rank).to(out.device)
    return (out.float() * g_out.float()).sum() + (recv_w * _g_w(case, rank, tuple(recv_w.shape)).to(out.device)).sum()


def run_ops_case(buf, case: OpsCase, compiled=None) -> dict:
    """Forward, backward and their checks (see the module docstring); ``compiled``: a compiled
    version of :func:`step` (same signature) whose forward and gradients must equal the eager ones
    bit for bit."""
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    E, T, A = case.num_experts, buf.num_max_tokens_per_rank, case.expert_alignment
    where = f"[rank {r}/{R} {case}] "
    ins = [make_inputs(case.seed, s, case.num_tokens[s], case.hidden, E, case.num_topk,
                       masked_ratio=case.masked_ratio) for s in range(R)]
    xs, topks, ws = ([i[j] for i in ins] for j in range(3))
    biases = [_g_out(dataclasses.replace(case, seed=case.seed + 1), s) if case.with_bias else None for s in range(R)]

    def run(fn):
        x = xs[r].to(dev).requires_grad_(True)
        w = ws[r].to(dev).requires_grad_(True)
        b = biases[r].to(dev).requires_grad_(True) if case.with_bias else None
        recv_x, recv_w, handle, y, out = fn(buf, case, x, topks[r].to(dev), w, b)
        y.retain_grad()
        loss_of(case, r, recv_w, out).backward()
        return dict(recv_x=recv_x.detach(), recv_w=recv_w.detach(), out=out.detach(), y_grad=y.grad, x_grad=x.grad,
                    w_grad=w.grad, b_grad=None if b is None else b.grad, rows=handle.num_rows,
                    offsets=ops.expert_offsets(handle) if case.expand else None)

    got = run(step)
    # the reference: forward
    q = [reference.quantize_fp8(x) for x in xs] if case.fp8 else None
    sent, sfs = ([d for d, _ in q], [s for _, s in q]) if case.fp8 else (xs, None)
    if case.expand:
        refs = [reference.dispatch_expand(d, sent, topks, ws, E, T, A, sfs) for d in range(R)]
        bases = [ref.base for ref in refs]
    else:
        refs = bases = [reference.dispatch(d, sent, topks, ws, E, T, sfs) for d in range(R)]
    rows_of = [ops.dequantize_fp8(ref.recv_x, ref.recv_sf) if case.fp8 else ref.recv_x for ref in refs]
    ref = refs[r]
    M = ref.recv_x.shape[0]
    assert got["recv_x"].shape[0] == got["rows"] >= M, where + f"rows {got['recv_x'].shape[0]} < {M}"
    assert_bitwise_equal("recv_x", got["recv_x"][:M].cpu(), rows_of[r], where)
    assert not got["recv_x"][M:].any(), where + "rows past the received ones are not zero"
    assert_bitwise_equal("recv_topk_weights", got["recv_w"][:M].cpu(), ref.recv_topk_weights, where)
    if case.expand:
        A_ = case.expert_alignment
        want = torch.cumsum((bases[r].num_recv_tokens_per_expert + A_ - 1) // A_ * A_, 0).to(torch.int32)
        assert_bitwise_equal("expert_offsets", got["offsets"].cpu(), want, where)
    ys = [(rows_of[d].float() * _scale(d)).to(torch.bfloat16) for d in range(R)]
    want_out = _ref_combine(case, r, ys, refs, bases, topks[r], E, T, buf, bias=biases[r])
    assert_bitwise_equal("combined", got["out"].cpu(), want_out, where)
    # the reference: backward
    g_outs = [_g_out(case, s) for s in range(R)]
    if case.expand:
        d_y = [reference.dispatch_expand(d, g_outs, topks, None, E, T, A).recv_x for d in range(R)]
    else:
        d_y = [reference.dispatch(d, g_outs, topks, None, E, T).recv_x for d in range(R)]
    assert_bitwise_equal("y.grad (combine's gradient)", got["y_grad"][:M].cpu(), d_y[r], where)
    assert not got["y_grad"][M:].any(), where + "y.grad rows past the received ones are not zero"
    d_recv = [(d_y[d].float() * _scale(d)).to(torch.bfloat16) for d in range(R)]
    g_ws = [_g_w(case, d, _recv_w_shape(refs[d], case, got["rows"]))[:refs[d].recv_x.shape[0]] for d in range(R)]
    want_x, want_w = _ref_combine(case, r, d_recv, refs, bases, topks[r], E, T, buf, weights=g_ws)
    assert_bitwise_equal("x.grad (dispatch's gradient)", got["x_grad"].cpu(), want_x, where)
    assert_bitwise_equal("topk_weights.grad", got["w_grad"].cpu(), want_w, where)
    if case.with_bias:
        assert_bitwise_equal("bias.grad", got["b_grad"].cpu(), g_outs[r], where)
    if compiled is not None:
        again = run(compiled)
        for name, t in got.items():
            # (y.grad: in a compiled step the loss reaches y inside the graph, not through its output)
            if isinstance(t, torch.Tensor) and name != "y_grad":
                assert_bitwise_equal(f"compiled {name}", again[name].cpu(), t.cpu(), where)
    return dict(rows=M)


def _recv_w_shape(ref, case: OpsCase, rows: int) -> tuple:
    return (rows,) if case.expand else (rows, case.num_topk)


def _ref_combine(case, rank, ys, refs, bases, topk, E, T, buf, bias=None, weights=None):
    """The reference combine of rows ``ys[d]`` (each rank's received order): ``combined`` (with
    ``weights``: ``(combined, combined weights)``)."""
    srcs = [b.recv_src_idx for b in bases]
    bias_t = (bias,) if bias is not None else ()
    if case.expand:
        out, out_w = reference.combine_expand(rank, ys, [ref.positions for ref in refs], srcs, topk, E, T,
                                              allow_multiple_reduction=buf.allow_multiple_reduction,
                                              recv_topk_weights=weights, bias=bias_t)
    else:
        out, out_w = reference.combine(rank, ys, srcs, topk, E, T, recv_topk_weights=weights, bias=bias_t,
                                       sum_weights=True)
    return (out, out_w) if weights is not None else out


def run_low_latency_ops_case(buf, case, compiled=None) -> dict:
    """V1's low-latency pair as operators (``tritonep.ops``), on a low-latency ``Buffer``: dispatch
    and combine of ``case`` (a :class:`tritonep.testing.low_latency_check.LLCase`: BF16 or FP8,
    ``cap``) against the reference, then the same through ``compiled`` (a compiled
    :func:`low_latency_step`) bit for bit."""
    from .low_latency_check import cap_rows, check_dispatch, expected

    R, r = buf.group_size, buf.rank
    dev = buf._ll.device
    ins, refs, ys = expected(case, R)
    x, topk, w = (t.to(dev) for t in ins[r])
    rows = cap_rows(case, refs)
    where = f"[rank {r}/{R} ops {case}] "
    want = reference.low_latency_combine(r, ys, refs, ins[r][1], ins[r][2], case.num_experts)
    for fn in (low_latency_step,) + ((compiled,) if compiled is not None else ()):
        out, count, handle, combined = fn(buf, x, topk, w, case, rows)
        check_dispatch(case, r, R, out, count, (handle.src_info, handle.layout_range, case.T, case.hidden,
                                                case.num_experts), refs, where)
        assert_bitwise_equal("combined_x", combined, want, where)
    return dict(rows=int(count.sum()))


def low_latency_step(buf, x, topk, w, case, rows):
    """A decode step through the operators: dispatch, the reference's stand-in expert, combine."""
    out, count, handle = ops.low_latency_dispatch(buf, x, topk, case.T, case.num_experts, use_fp8=case.use_fp8,
                                                  round_scale=case.round_scale, use_ue8m0=case.use_ue8m0,
                                                  num_max_recv_tokens_per_expert=rows)
    y = combine_input((out[0] if case.use_fp8 else out).float().to(torch.bfloat16), buf.rank)  # (elementwise)
    return out, count, handle, ops.low_latency_combine(buf, y, topk, w, handle)
