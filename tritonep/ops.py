"""``ElasticBuffer`` as PyTorch operators: ``torch.ops.tritonep.dispatch``, ``cached_dispatch`` and
``combine``, with autograd and fake (meta) implementations, so that ``torch.compile(fullgraph=True)``
traces a model that calls them and training differentiates through them; and V1's low-latency pair
(``low_latency_dispatch`` / ``low_latency_combine``, forward only: decode loops).

Use the functions of this module (they pick the operator arguments)::

    recv_x, recv_topk_idx, recv_w, handle = tritonep.ops.dispatch(buffer, x, topk_idx, topk_weights,
                                                                   num_experts=E, expand=True)
    y = experts(recv_x, handle)            # rows past handle's valid ones are zero, leave them so
    out = tritonep.ops.combine(buffer, y, handle)

Shapes are static (no host sync, so nothing data-dependent reaches the graph): the outputs have
the worst-case rows, or ``num_max_recv_tokens`` (:func:`tritonep.recv_capacity`):

* normal layout: ``recv_x`` ``[M, H]`` bf16 with ``M = min(num_max_recv_tokens, R*T)`` received
  tokens, ``recv_topk_idx`` ``[M, k]`` int64 (local expert or -1), ``recv_w`` ``[M, k]`` float32;
* expanded (``expand=True``): ``recv_x`` ``[M_exp, H]``, one row per (token, local expert), each
  expert's rows at ``psum[e-1]`` aligned (``expert_alignment``), ``recv_w`` ``[M_exp]`` float32,
  ``recv_topk_idx`` ``[0, k]``. :func:`expert_offsets` gives ``[L]`` int32 row ends per expert
  (``torch._grouped_mm``'s ``offs``).

Rows that hold no received token (past the last one, alignment padding) are zero in every output
(so a grouped GEMM over them adds nothing to a weight's gradient). Gradients: ``dispatch``'s is a
``combine`` of the received rows' gradients (weights: the fp32 sum of the weight rows sent back,
V1's rule; expanded: each row's weight to its slot), ``combine``'s is a ``cached_dispatch`` of the
output's gradient (``bias``: the output's gradient), rows that hold no token zero.

The operators are ordered effects (``torch._higher_order_ops.effects``): compiled graphs keep them
in program order and never merge or drop one, so every rank issues the same collective sequence.
A buffer is named by its id (``tritonep.buffer.LIVE_BUFFERS``); :class:`Handle` carries the
routing layout as one int32 tensor (the handle's eight tensors packed) and the sizes.
Inputs are bf16 on buffers without ``use_fp8_dispatch`` (``fp8=True`` casts before the dispatch);
no CPU sync, so one host round trip fewer than a synced dispatch, and worst-case or bounded output
rows; the symmetric backend (one host).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .buffer import LIVE_BUFFERS
from .handle import EPHandle, expanded_rows
from .legacy import LIVE_LOW_LATENCY
from .reference import quantize_fp8
from .sizing import num_expanded_rows


class Handle(NamedTuple):
    """What :func:`combine` and :func:`cached_dispatch` need from a :func:`dispatch`: ``words`` (the
    routing layout, ``[W]`` int32, see :func:`_pack`) and the sizes, all static."""

    words: Tensor
    buffer_id: int
    expand: bool
    num_experts: int
    expert_alignment: int
    num_max_tokens_per_rank: int
    num_ranks: int
    num_tokens: int  # n: tokens this rank dispatched
    num_topk: int
    num_recv_tokens: int  # rows of the normal layout's outputs (and of the layout's metadata)
    num_expanded_tokens: int  # rows of the expanded layout's outputs

    @property
    def meta(self) -> list:
        """The sizes as the operators take them (every field but ``words``, as ints)."""
        return _meta(self[1:])

    @property
    def num_rows(self) -> int:
        """Rows of ``recv_x`` (and of what :func:`combine` takes)."""
        return self.num_expanded_tokens if self.expand else self.num_recv_tokens


def _meta(sizes) -> list[int]:
    return [int(v) for v in sizes]


def _buffer(buffer_id: int):
    buf = LIVE_BUFFERS.get(buffer_id)
    if buf is None:
        raise RuntimeError(f"tritonep.ops: ElasticBuffer #{buffer_id} is gone")
    return buf


# -- the handle's tensors, packed into one (custom operators may not return views of one another) --
def _sections(n: int, k: int, R: int, L: int, rows: int) -> list:
    """``(name, shape, int32 words)`` of each handle tensor in :func:`_pack`'s order (``topk_idx``:
    int64, two words per entry)."""
    return [("topk_idx", (n, k), 2 * n * k), ("psum_num_recv_tokens_per_scaleup_rank", (R,), R),
            ("psum_num_recv_tokens_per_expert", (L,), L), ("num_unaligned_recv_tokens_per_expert", (L,), L),
            ("recv_src_metadata", (rows, k + 2), rows * (k + 2)), ("dst_buffer_slot_idx", (n, k), n * k),
            ("combine_slot_idx", (n, k), n * k), ("send_counts", (R, 1 + L), R * (1 + L))]


def _pack(h: EPHandle, R: int) -> Tensor:
    n, k = h.topk_idx.shape
    parts = [getattr(h, name).reshape(-1).view(torch.int32) if name == "topk_idx" else getattr(h, name).reshape(-1)
             for name, _, _ in _sections(n, k, R, h.num_experts // R, h.num_recv_tokens)]
    return torch.cat(parts)


def _unpack(words: Tensor, n: int, k: int, R: int, L: int, rows: int) -> dict:
    out, at = {}, 0
    for name, shape, size in _sections(n, k, R, L, rows):
        part = words[at:at + size]
        out[name] = part.view(torch.int64).view(shape) if name == "topk_idx" else part.view(shape)
        at += size
    return out


def _words(n: int, k: int, R: int, L: int, rows: int) -> int:
    return sum(size for _, _, size in _sections(n, k, R, L, rows))


def _handle(meta: list, words: Tensor) -> EPHandle:
    """The ``EPHandle`` a :class:`Handle`'s ``meta`` and ``words`` stand for."""
    buffer_id, expand, E, A, T, R, n, k, rows, expanded = meta
    parts = _unpack(words, n, k, R, E // R, rows)
    return EPHandle(do_expand=bool(expand), num_experts=E, expert_alignment=A, num_max_tokens_per_rank=T, num_sms=0,
                    num_recv_tokens=rows, num_expanded_tokens=expanded, num_recv_tokens_per_expert_list=[],
                    buffer_id=buffer_id, **parts)


def dequantize_fp8(data: Tensor, scales: Tensor) -> Tensor:
    """``[M, H]`` bf16 from ``float8_e4m3fn [M, H]`` and ``float32 [M, H/128]`` scales."""
    M, H = data.shape
    return (data.float().view(M, H // 128, 128) * scales[:, :, None]).view(M, H).to(torch.bfloat16)


def _valid_rows(h: EPHandle, rows: int) -> Tensor:
    """``[rows]`` bool on the device: the output rows that hold a received token."""
    if not h.do_expand:
        r = torch.arange(rows, device=h.recv_src_metadata.device, dtype=torch.int32)
        return r < h.psum_num_recv_tokens_per_scaleup_rank[-1:]
    return expanded_rows(h.psum_num_recv_tokens_per_expert, h.expert_alignment, rows)[0]


def _zero_invalid(t: Optional[Tensor], valid: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    return t.masked_fill_((~valid).view(-1, *([1] * (t.dim() - 1))), 0)


def _fresh(outputs: tuple, inputs: tuple) -> tuple:
    """``outputs`` with a clone of each that shares memory with an input or an earlier output
    (custom operators may return neither)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    out = []
    for t in outputs:
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


# -- the operators ---------------------------------------------------------------------------------
@torch.library.custom_op("tritonep::dispatch", mutates_args=())
def _dispatch(x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor], meta: list[int], cap: int, fp8: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    buf = _buffer(meta[0])
    expand, E, A = bool(meta[1]), meta[2], meta[3]
    recv_x, recv_topk, recv_w, h, _ = buf.dispatch(quantize_fp8(x) if fp8 else x, topk_idx=topk_idx,
                                                   topk_weights=topk_weights, num_experts=E, expert_alignment=A,
                                                   do_cpu_sync=False, do_expand=expand, num_max_recv_tokens=cap or None)
    if fp8:
        recv_x = dequantize_fp8(*recv_x)
    if h.backend_state is not None or h.host_psum is not None:
        raise NotImplementedError(f"tritonep.ops: the {buf.backend!r} backend's handles hold host state; the "
                                  "operators need the symmetric backend (one host)")
    if (h.num_recv_tokens, h.num_expanded_tokens) != (meta[8], meta[9]):
        raise RuntimeError(f"tritonep.ops.dispatch: the buffer returned {h.num_recv_tokens} / "
                           f"{h.num_expanded_tokens} rows, the operator promised {meta[8]} / {meta[9]}")
    valid = _valid_rows(h, recv_x.shape[0])
    recv_x, recv_w = _zero_invalid(recv_x, valid), _zero_invalid(recv_w, valid)
    if recv_topk is None:
        recv_topk = torch.empty((0, topk_idx.shape[1]), dtype=torch.int64, device=x.device)
    if recv_w is None:
        recv_w = torch.empty(0, dtype=torch.float32, device=x.device)
    return _fresh((recv_x, recv_topk, recv_w, _pack(h, meta[5])), (x, topk_idx, topk_weights))


@_dispatch.register_fake
def _(x, topk_idx, topk_weights, meta, cap, fp8):
    _, expand, E, A, T, R, n, k, rows, expanded = meta
    M = expanded if expand else rows
    recv_topk = x.new_empty((0, k) if expand else (rows, k), dtype=torch.int64)
    w_shape = (0,) if topk_weights is None else ((M,) if expand else (rows, k))
    return (x.new_empty((M, x.shape[1])), recv_topk, x.new_empty(w_shape, dtype=torch.float32),
            x.new_empty(_words(n, k, R, E // R, rows), dtype=torch.int32))


@torch.library.custom_op("tritonep::cached_dispatch", mutates_args=())
def _cached_dispatch(x: Tensor, words: Tensor, topk_weights: Optional[Tensor], meta: list[int]
                     ) -> tuple[Tensor, Tensor]:
    h = _handle(meta, words)
    recv_x, _, recv_w, _, _ = _buffer(meta[0]).dispatch(x, handle=h, topk_weights=topk_weights, do_expand=h.do_expand)
    valid = _valid_rows(h, recv_x.shape[0])
    recv_x, recv_w = _zero_invalid(recv_x, valid), _zero_invalid(recv_w, valid)
    if recv_w is None:
        recv_w = torch.empty(0, dtype=torch.float32, device=x.device)
    return _fresh((recv_x, recv_w), (x, words, topk_weights))


@_cached_dispatch.register_fake
def _(x, words, topk_weights, meta):
    expand, k, rows, expanded = meta[1], meta[7], meta[8], meta[9]
    M = expanded if expand else rows
    w_shape = (0,) if topk_weights is None else ((M,) if expand else (rows, k))
    return x.new_empty((M, x.shape[1])), x.new_empty(w_shape, dtype=torch.float32)


@torch.library.custom_op("tritonep::combine", mutates_args=())
def _combine(y: Tensor, words: Tensor, topk_weights: Optional[Tensor], bias: Optional[Tensor], meta: list[int],
             sum_weights: bool) -> tuple[Tensor, Tensor]:
    h = _handle(meta, words)
    out, out_w, _ = _buffer(meta[0])._combine(y, h, topk_weights, bias, 0, None, None, False, False,
                                              sum_weights=sum_weights)
    if out_w is None:
        out_w = torch.empty(0, dtype=torch.float32, device=y.device)
    return _fresh((out, out_w), (y, words, topk_weights, bias))


@_combine.register_fake
def _(y, words, topk_weights, bias, meta, sum_weights):
    n, k = meta[6], meta[7]
    return y.new_empty((n, y.shape[1])), y.new_empty((0,) if topk_weights is None else (n, k), dtype=torch.float32)


# -- autograd ----------------------------------------------------------------------------------------
def _rows_grad(grad: Optional[Tensor], rows: int, hidden: int, device) -> Tensor:
    """A row gradient as the kernels take it: contiguous bf16 (zeros where autograd gave none)."""
    if grad is None:
        return torch.zeros((rows, hidden), dtype=torch.bfloat16, device=device)
    return grad.to(torch.bfloat16).contiguous()


def _setup_dispatch(ctx, inputs, output):
    """(dispatch and cached dispatch: ``x`` first, ``topk_weights`` third, the words saved)"""
    x, words, topk_weights, meta = inputs[0], (output[3] if len(output) == 4 else inputs[1]), inputs[2], inputs[3]
    ctx.meta, ctx.has_w, ctx.hidden = meta, topk_weights is not None, x.shape[1]
    ctx.save_for_backward(words)


def _backward_rows(ctx, grad_x, grad_w):
    """``(grad of x, grad of topk_weights)`` of a (cached) dispatch: the combine of the row
    gradients (normal layout: the weight rows summed, V1's rule; expanded: each row's weight to
    its slot)."""
    (words,) = ctx.saved_tensors
    meta = ctx.meta
    expand, k = meta[1], meta[7]
    rows = meta[9] if expand else meta[8]
    gw = None
    if ctx.has_w and ctx.needs_input_grad[2]:
        gw = grad_w if grad_w is not None else torch.zeros((rows,) if expand else (rows, k), device=words.device)
        gw = gw.float().contiguous()
    out, out_w = torch.ops.tritonep.combine(_rows_grad(grad_x, rows, ctx.hidden, words.device), words, gw, None,
                                            meta, not expand)
    return out, (out_w if gw is not None else None)


def _backward_dispatch(ctx, grad_x, grad_topk, grad_w, grad_words):
    gx, gw = _backward_rows(ctx, grad_x, grad_w)  # (FP8: the cast passes gradients through unchanged)
    return gx, None, gw, None, None, None


def _backward_cached(ctx, grad_x, grad_w):
    gx, gw = _backward_rows(ctx, grad_x, grad_w)
    return gx, None, gw, None


_dispatch.register_autograd(_backward_dispatch, setup_context=_setup_dispatch)
_cached_dispatch.register_autograd(_backward_cached, setup_context=_setup_dispatch)


def _setup_combine(ctx, inputs, output):
    y, words, topk_weights, bias, meta, _ = inputs
    if topk_weights is not None and topk_weights.requires_grad:
        raise NotImplementedError("tritonep.ops.combine: no gradient for topk_weights (scale the rows before "
                                  "combining, as DeepEP does)")
    ctx.meta, ctx.has_bias = meta, bias is not None
    ctx.save_for_backward(words)


def _backward_combine(ctx, grad_out, grad_w):
    (words,) = ctx.saved_tensors
    gy = None
    if ctx.needs_input_grad[0]:
        gy, _ = torch.ops.tritonep.cached_dispatch(grad_out.to(torch.bfloat16).contiguous(), words, None, ctx.meta)
    gb = grad_out if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gy, None, None, gb, None, None


_combine.register_autograd(_backward_combine, setup_context=_setup_combine)


# -- V1's low-latency pair (forward only: decode) --------------------------------------------------
def _v1(owner: int):
    buf = LIVE_LOW_LATENCY.get(owner)
    if buf is None:
        raise RuntimeError("tritonep.ops: that low-latency Buffer is gone")
    return buf


@torch.library.custom_op("tritonep::low_latency_dispatch", mutates_args=())
def _ll_dispatch(x: Tensor, topk_idx: Tensor, meta: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    owner, T, E, fp8, round_scale, ue8m0, rows = meta
    # (low_latency_dispatch below validated the call: the operator skips V1's checks)
    out, count, h, _, _ = _v1(owner)._low_latency().dispatch(x, topk_idx, T, E, None, None, bool(fp8),
                                                             bool(round_scale), bool(ue8m0), False, False, rows)
    recv_x, recv_sf = out if fp8 else (out, x.new_empty(0, dtype=torch.float32))
    return recv_x, recv_sf, count, h[0], h[1], h.slot_info


@_ll_dispatch.register_fake
def _(x, topk_idx, meta):
    owner, T, E, fp8, round_scale, ue8m0, rows = meta
    R = _v1(owner).group_size
    L, H = E // R, x.shape[1]
    recv_x = x.new_empty((L, rows, H), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
    if fp8:  # column-major in the last two dimensions, as the real outputs
        P, dtype = (H // 512, torch.int32) if ue8m0 else (H // 128, torch.float32)
        recv_sf = x.new_empty_strided((L, rows, P), (rows * P, 1, rows), dtype=dtype)
    else:
        recv_sf = x.new_empty(0, dtype=torch.float32)
    return (recv_x, recv_sf, x.new_empty(L, dtype=torch.int32), x.new_empty((L, rows), dtype=torch.int32),
            x.new_empty((L, R), dtype=torch.int64), x.new_empty((L, rows), dtype=torch.int32))


@torch.library.custom_op("tritonep::low_latency_combine", mutates_args=())
def _ll_combine(y: Tensor, topk_idx: Tensor, topk_weights: Tensor, src_info: Tensor, layout_range: Tensor,
                slot_info: Tensor, meta: list[int]) -> Tensor:
    from .low_latency import LLHandle

    owner, T, E = meta
    handle = LLHandle((src_info, layout_range, T, y.shape[2], E), slot_info, None, owner)
    out, _, _ = _v1(owner).low_latency_combine(y, topk_idx, topk_weights, handle)
    return out


@_ll_combine.register_fake
def _(y, topk_idx, topk_weights, src_info, layout_range, slot_info, meta):
    return y.new_empty((topk_idx.shape[0], y.shape[2]))


class LowLatencyHandle(NamedTuple):
    """What :func:`low_latency_combine` needs from :func:`low_latency_dispatch`."""

    src_info: Tensor  # [L, rows] int32
    layout_range: Tensor  # [L, R] int64
    slot_info: Tensor  # [L, rows] int32
    owner: int
    num_max_dispatch_tokens_per_rank: int
    num_experts: int


def low_latency_dispatch(buffer, x: Tensor, topk_idx: Tensor, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                         num_max_recv_tokens_per_expert: Optional[int] = None):
    """V1's ``low_latency_dispatch`` as an operator (``torch.ops.tritonep.low_latency_dispatch``):
    ``(recv_x [L, rows, H] (with FP8: (data, scales)), recv_count [L] int32, handle)``, ``rows =
    R*T`` or ``num_max_recv_tokens_per_expert``. Forward only (decode); no hooks, no async."""
    from .low_latency import check_dispatch, output_rows

    T, E = num_max_dispatch_tokens_per_rank, num_experts
    check_dispatch(x, topk_idx, T, E, buffer.group_size, use_fp8, use_ue8m0, round_scale, False, False, None, None,
                   buffer._low_latency_state().device, num_max_recv_tokens_per_expert)
    rows = output_rows(buffer.group_size, T, num_max_recv_tokens_per_expert)
    meta = [id(buffer), T, E, int(use_fp8), int(round_scale), int(use_ue8m0), rows]
    recv_x, recv_sf, count, src_info, layout_range, slot_info = torch.ops.tritonep.low_latency_dispatch(
        x, topk_idx, meta)
    return ((recv_x, recv_sf) if use_fp8 else recv_x, count,
            LowLatencyHandle(src_info, layout_range, slot_info, id(buffer), T, E))


def low_latency_combine(buffer, y: Tensor, topk_idx: Tensor, topk_weights: Tensor, handle: LowLatencyHandle) -> Tensor:
    """V1's ``low_latency_combine`` as an operator: ``[n, H]`` bf16, the weighted sum of each
    token's expert rows (``y`` ``[L, rows, H]`` bf16). Forward only."""
    if not isinstance(handle, LowLatencyHandle) or handle.owner != id(buffer):
        raise ValueError("handle must come from tritonep.ops.low_latency_dispatch on this Buffer")
    return torch.ops.tritonep.low_latency_combine(y, topk_idx, topk_weights, handle.src_info, handle.layout_range,
                                                  handle.slot_info, [handle.owner,
                                                                     handle.num_max_dispatch_tokens_per_rank,
                                                                     handle.num_experts])


def _ordered() -> None:
    """Make the operators ordered effects (see the module docstring)."""
    from torch._higher_order_ops.effects import _EffectType, _register_effectful_op

    for op in (torch.ops.tritonep.dispatch.default, torch.ops.tritonep.cached_dispatch.default,
               torch.ops.tritonep.combine.default, torch.ops.tritonep.low_latency_dispatch.default,
               torch.ops.tritonep.low_latency_combine.default):
        _register_effectful_op(op, _EffectType.ORDERED)


_ordered()


# -- the functions users call ----------------------------------------------------------------------
def dispatch(buffer, x: Tensor, topk_idx: Tensor, topk_weights: Optional[Tensor] = None, *, num_experts: int,
             expand: bool = False, expert_alignment: int = 1, num_max_recv_tokens: Optional[int] = None,
             fp8: bool = False):
    """``(recv_x, recv_topk_idx, recv_topk_weights, handle)`` (see the module docstring): ``x``
    ``[n, H]`` bf16, ``topk_idx`` ``[n, k]`` int64 (-1: empty slot), ``topk_weights`` ``[n, k]``
    float32 or None. Differentiable in ``x`` and ``topk_weights``. ``recv_topk_weights`` is
    None without ``topk_weights``; ``recv_topk_idx`` None with ``expand``.

    ``fp8``: the rows travel as FP8 (``float8_e4m3fn``, a float32 scale per token and 128
    channels: half the bytes) and come back as bf16 (each group times its scale); the gradient
    passes the cast unchanged (bf16 in the backward's combine). ``H`` a multiple of 128."""
    if getattr(buffer, "use_fp8_dispatch", False):
        raise ValueError("tritonep.ops.dispatch: the operators cast to FP8 themselves (fp8=True); build the buffer "
                         "without use_fp8_dispatch (it would cast the backward's rows too)")
    if fp8 and x.shape[1] % 128:
        raise ValueError(f"tritonep.ops.dispatch: fp8 needs hidden ({x.shape[1]}) to be a multiple of 128")
    R, T = buffer.num_ranks, buffer.num_max_tokens_per_rank
    if not T:
        raise ValueError("tritonep.ops.dispatch: build the buffer with num_max_tokens_per_rank (the outputs' "
                         "static size comes from it)")
    n, k = topk_idx.shape
    L = num_experts // R
    cap = num_max_recv_tokens if num_max_recv_tokens is not None else (buffer.num_max_recv_tokens or 0)
    worst_exp = num_expanded_rows(None, R * T, k, L, expert_alignment)
    rows = R * T if expand or not cap else min(cap, R * T)
    expanded = min(cap, worst_exp) if expand and cap else worst_exp
    sizes = (buffer._id, bool(expand), num_experts, expert_alignment, T, R, n, k, rows, expanded)
    recv_x, recv_topk, recv_w, words = torch.ops.tritonep.dispatch(x, topk_idx, topk_weights,
                                                                   _meta(sizes), cap, bool(fp8))
    # (built once, here: torch 2.11's compiler fails to return a NamedTuple made by _replace)
    return (recv_x, None if expand else recv_topk, recv_w if topk_weights is not None else None,
            Handle(words, *sizes))


def cached_dispatch(buffer, x: Tensor, handle: Handle, topk_weights: Optional[Tensor] = None):
    """``(recv_x, recv_topk_weights)``: ``x`` sent along ``handle``'s routing (differentiable)."""
    _check(buffer, handle)
    recv_x, recv_w = torch.ops.tritonep.cached_dispatch(x, handle.words, topk_weights, handle.meta)
    return recv_x, recv_w if topk_weights is not None else None


def combine(buffer, y: Tensor, handle: Handle, bias: Optional[Tensor] = None) -> Tensor:
    """``[n, H]`` bf16: each token's rows summed back (fp32, one rounding; DeepEP's combine).
    ``y``: ``[handle.num_rows, H]`` bf16; ``bias``: ``[n, H]`` bf16 or None. Differentiable in
    ``y`` and ``bias``."""
    _check(buffer, handle)
    out, _ = torch.ops.tritonep.combine(y, handle.words, None, bias, handle.meta, False)
    return out


def expert_offsets(handle: Handle) -> Tensor:
    """``[L]`` int32: each local expert's end row in an expanded ``recv_x`` (aligned, inclusive
    prefix sum: ``torch._grouped_mm``'s ``offs``)."""
    if not handle.expand:
        raise ValueError("expert_offsets needs an expanded dispatch (expand=True)")
    n, k, R, L = handle.num_tokens, handle.num_topk, handle.num_ranks, handle.num_experts // handle.num_ranks
    parts = _unpack(handle.words, n, k, R, L, handle.num_recv_tokens)
    counts = parts["num_unaligned_recv_tokens_per_expert"]
    A = handle.expert_alignment
    return torch.cumsum((counts + A - 1) // A * A, 0, dtype=torch.int32)


def _check(buffer, handle) -> None:
    if not isinstance(handle, Handle):
        raise TypeError(f"handle must be a tritonep.ops.Handle from tritonep.ops.dispatch, got {type(handle).__name__}")
    if handle.buffer_id != buffer._id:
        raise ValueError(f"handle was made by ElasticBuffer #{handle.buffer_id}; this is #{buffer._id}")


__all__ = ["Handle", "LowLatencyHandle", "dispatch", "cached_dispatch", "combine", "expert_offsets",
           "low_latency_dispatch", "low_latency_combine"]
