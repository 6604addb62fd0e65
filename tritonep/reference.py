"""Pure-torch reference of dispatch and combine: the oracle of the tests.

It sees every rank's inputs at once (one process, no communication), and is written for clarity,
not speed. Ordering follows tritonep's documented layout: received rows in ascending global source
index (source rank, then source token); combine sums in fp32 in top-k slot order (spec 3.4).

Vocabulary: ``num_ranks`` (R), ``num_max_tokens_per_rank`` (T), ``hidden`` (H), ``num_topk`` (k),
``num_experts`` (E), ``num_local_experts`` (L = E / R).
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RefDispatch:
    """What rank ``rank`` receives (M = received tokens).

    * ``recv_x``: ``[M, H]`` (same dtype as the inputs); ``recv_sf``: ``[M, P]`` or None
    * ``recv_topk_idx``: ``[M, k]`` int64, local expert index or -1
    * ``recv_topk_weights``: ``[M, k]`` float32 (verbatim source rows) or None
    * ``recv_src_idx``: ``[M]`` int64 global source index ``src_rank * T + t``
    * ``num_recv_tokens_per_source``: ``[R]`` int64
    * ``num_recv_tokens_per_expert``: ``[L]`` int64 (unaligned)
    """

    recv_x: torch.Tensor
    recv_sf: torch.Tensor | None
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor | None
    recv_src_idx: torch.Tensor
    num_recv_tokens_per_source: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor


def source_order(num_ranks: int, num_scaleup_ranks: int | None = None) -> list:
    """The order in which a receiver's rows come by source rank: rank order (direct mode), or in
    hybrid mode with ``U = num_scaleup_ranks`` ranks per host grouped by the source's scale-up index
    ``s % U`` (spec 2.4; DeepEP forwards each token from the source's rail peer), sources of one
    index in rank order. Example: 4 ranks, ``U = 2``: ``[0, 2, 1, 3]``."""
    U = num_scaleup_ranks or num_ranks
    return [s for u in range(U) for s in range(u, num_ranks, U)]


def dispatch(rank: int, xs: list, topk_idxs: list, topk_weights: list | None, num_experts: int,
             num_max_tokens_per_rank: int, sfs: list | None = None,
             num_scaleup_ranks: int | None = None) -> RefDispatch:
    """Reference dispatch for receiver ``rank``. ``xs[s]``: ``[n_s, H]``; ``topk_idxs[s]``: ``[n_s, k]``.
    ``num_scaleup_ranks``: hybrid mode's ranks per host (rows by :func:`source_order`; within a
    source, ascending token), else direct mode. ``num_recv_tokens_per_source`` stays by rank."""
    num_ranks = len(xs)
    L = num_experts // num_ranks
    lo, hi = rank * L, (rank + 1) * L
    rows, sf_rows, idx_rows, w_rows, src_rows = [], [], [], [], []
    per_source = [0] * num_ranks
    per_expert = torch.zeros(L, dtype=torch.int64)
    for s in source_order(num_ranks, num_scaleup_ranks):
        topk = topk_idxs[s].cpu().to(torch.int64)
        mine = (topk >= lo) & (topk < hi)
        take = mine.any(dim=1).nonzero().flatten()
        per_source[s] = len(take)
        rows.append(xs[s].cpu()[take])
        if sfs is not None:
            sf_rows.append(sfs[s].cpu()[take])
        idx_rows.append(torch.where(mine, topk - lo, -1)[take])
        if topk_weights is not None:
            w_rows.append(topk_weights[s].cpu()[take])
        src_rows.append(s * num_max_tokens_per_rank + take)
        per_expert += torch.bincount(topk[mine] - lo, minlength=L)
    return RefDispatch(
        recv_x=torch.cat(rows),
        recv_sf=torch.cat(sf_rows) if sfs is not None else None,
        recv_topk_idx=torch.cat(idx_rows),
        recv_topk_weights=torch.cat(w_rows) if topk_weights is not None else None,
        recv_src_idx=torch.cat(src_rows),
        num_recv_tokens_per_source=torch.tensor(per_source, dtype=torch.int64),
        num_recv_tokens_per_expert=per_expert,
    )


def _routes(topk_row: list, num_local_experts: int) -> dict:
    """``{destination rank: [its top-k slots, ascending]}`` of one token (empty slots skipped)."""
    slots_of: dict = {}
    for s, e in enumerate(topk_row):
        if e >= 0:
            slots_of.setdefault(e // num_local_experts, []).append(s)
    return slots_of


def _origin_sum(placed: dict, bias_rows: list, hidden: int) -> torch.Tensor:
    """Spec 3.4's final level: ``float(b0) + float(b1)``, then the placed fp32 rows in ascending
    position order, one rounding to bf16. Without bias the first row starts the sum."""
    acc = None
    for b in bias_rows:
        acc = b.float() if acc is None else acc + b.float()
    for pos in sorted(placed):
        acc = placed[pos] if acc is None else acc + placed[pos]
    return (acc if acc is not None else torch.zeros(hidden)).to(torch.bfloat16)


def _reduce_hosts(placed: dict, host_of: dict) -> dict:
    """Spec 3.4's scale-up level: ``placed`` (position -> fp32 row) summed per host (``host_of``:
    position -> host) in ascending position order, rounded to bf16 once, at the host's highest
    position; a host with one row keeps it unchanged."""
    out = {}
    for host in sorted(set(host_of.values())):
        positions = sorted(p for p in placed if host_of[p] == host)
        acc = placed[positions[0]]
        for p in positions[1:]:
            acc = acc + placed[p]
        out[positions[-1]] = acc.to(torch.bfloat16).float() if len(positions) > 1 else acc
    return out


def combine(rank: int, ys: list, recv_src_idxs: list, topk_idx: torch.Tensor, num_experts: int,
            num_max_tokens_per_rank: int, recv_topk_weights: list | None = None,
            bias: tuple = (), num_scaleup_ranks: int | None = None,
            sum_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference combine for origin ``rank``.

    ``ys[d]``: ``[M_d, H]`` bf16, one row per token rank ``d`` received, in the order of
    ``recv_src_idxs[d]`` (``[M_d]`` global source indices). ``topk_idx``: this rank's ``[n, k]``.
    ``recv_topk_weights[d]``: ``[M_d, k]`` float32 that rank ``d`` sends back, or None.
    ``bias``: zero, one or two ``[n, H]`` bf16 tensors.

    Returns ``combined_x`` ``[n, H]`` bf16 and ``combined_topk_weights`` ``[n, k]`` float32 (or None).

    Per token: the partial rows of its destination ranks, each positioned at the rank's highest
    top-k slot, are added in ascending slot order to ``float(bias_0) + float(bias_1)`` in fp32,
    then rounded to bf16 once. Without bias the first partial starts the sum (so a lone partial is
    copied bit for bit, -0.0 included). A slot's combined weight is the weight that the rank
    owning its expert sent back; empty slots get 0.

    ``sum_weights`` (V1's ``Buffer.combine``): a token's combined weights are the fp32 sum, from
    +0.0, of the whole weight rows its destination ranks sent back, in ascending order of their
    highest slot (empty slots included).

    ``num_scaleup_ranks`` (hybrid mode with ``allow_multiple_reduction``, ``U`` ranks per host):
    first the partials of one host's ranks are summed in fp32 in slot order and rounded to bf16,
    positioned at the host's highest slot (spec 3.4 level "scale-up"; a host with one partial
    passes it on unchanged), then the final sum over hosts as above.
    """
    num_ranks = len(ys)
    L = num_experts // num_ranks
    topk = topk_idx.cpu().to(torch.int64)
    n, k = topk.shape
    H = ys[0].shape[1] if ys else 0
    out = torch.empty(n, H, dtype=torch.bfloat16)
    out_w = torch.zeros(n, k, dtype=torch.float32) if recv_topk_weights is not None else None
    lookup = [{int(g): i for i, g in enumerate(src.cpu().tolist())} for src in recv_src_idxs]
    for t, row in enumerate(topk.tolist()):
        g = rank * num_max_tokens_per_rank + t
        routes = _routes(row, L)
        # each destination's one row sits at its highest slot
        placed = {max(slots): ys[d][lookup[d][g]].cpu().float() for d, slots in routes.items()}
        if num_scaleup_ranks:
            placed = _reduce_hosts(placed, {max(slots): d // num_scaleup_ranks for d, slots in routes.items()})
        out[t] = _origin_sum(placed, [b[t].cpu() for b in bias], H)
        if out_w is not None and sum_weights:
            acc = torch.zeros(k, dtype=torch.float32)
            for _, d in sorted((max(slots), d) for d, slots in routes.items()):
                acc = acc + recv_topk_weights[d][lookup[d][g]].cpu()
            out_w[t] = acc
        elif out_w is not None:
            for d, slots in routes.items():
                for s in slots:
                    out_w[t, s] = recv_topk_weights[d][lookup[d][g], s]
    return out, out_w


@dataclasses.dataclass
class RefExpandDispatch:
    """Expand-mode result for one receiver (M_exp = Σ align(count_i, A)).

    * ``recv_x``: ``[M_exp, H]``, padding rows zero; ``recv_sf``: ``[M_exp, P]`` or None
    * ``recv_topk_weights``: ``[M_exp]`` float32 or None
    * ``positions``: ``[M, k]`` int64, the expanded row of each (received token, slot), -1 if the
      slot's expert is elsewhere (this is ``recv_src_metadata[:, 2:]``)
    * ``valid``: ``[M_exp]`` bool, False on padding rows
    * ``psum``: ``[L]`` int64, ``start_i + count_i`` (spec 2.5, expand mode)
    * ``base``: the normal-mode :class:`RefDispatch`
    """

    recv_x: torch.Tensor
    recv_sf: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    positions: torch.Tensor
    valid: torch.Tensor
    psum: torch.Tensor
    base: RefDispatch


def dispatch_expand(rank: int, xs: list, topk_idxs: list, topk_weights: list | None, num_experts: int,
                    num_max_tokens_per_rank: int, expert_alignment: int, sfs: list | None = None,
                    num_scaleup_ranks: int | None = None) -> RefExpandDispatch:
    """Reference of ``dispatch(do_expand=True)``: one row per (received token, local expert), expert
    ``i``'s rows at ``[start_i, start_i + count_i)`` in the received order (ascending global source
    index; in hybrid mode, ``num_scaleup_ranks``, by :func:`source_order`)."""
    base = dispatch(rank, xs, topk_idxs, topk_weights, num_experts, num_max_tokens_per_rank, sfs, num_scaleup_ranks)
    A = expert_alignment
    counts = base.num_recv_tokens_per_expert
    aligned = (counts + A - 1) // A * A
    start = torch.cumsum(aligned, 0) - aligned
    M_exp = int(aligned.sum())
    M, k = base.recv_topk_idx.shape
    H = base.recv_x.shape[1] if M else (xs[0].shape[1] if xs else 0)
    out_x = torch.zeros((M_exp, H), dtype=base.recv_x.dtype)
    out_sf = torch.zeros((M_exp, base.recv_sf.shape[1]), dtype=base.recv_sf.dtype) if sfs is not None else None
    out_w = torch.zeros(M_exp, dtype=torch.float32) if topk_weights is not None else None
    positions = torch.full((M, k), -1, dtype=torch.int64)
    valid = torch.zeros(M_exp, dtype=torch.bool)
    fill = start.tolist()
    rows, slots, places = [], [], []
    topk = base.recv_topk_idx.tolist()
    for i in range(M):  # received rows in ascending global source index; each expert's rows keep that order
        for s in range(k):
            e = topk[i][s]
            if e >= 0:
                rows.append(i)
                slots.append(s)
                places.append(fill[e])
                fill[e] += 1
    rows, slots, places = (torch.tensor(v, dtype=torch.int64) for v in (rows, slots, places))
    out_x[places] = base.recv_x[rows]
    if out_sf is not None:
        out_sf[places] = base.recv_sf[rows]
    if out_w is not None:
        out_w[places] = base.recv_topk_weights[rows, slots]
    positions[rows, slots] = places
    valid[places] = True
    return RefExpandDispatch(out_x, out_sf, out_w, positions, valid, start + counts, base)


def combine_expand(rank: int, ys: list, positions: list, recv_src_idxs: list, topk_idx: torch.Tensor,
                   num_experts: int, num_max_tokens_per_rank: int, allow_multiple_reduction: bool = True,
                   recv_topk_weights: list | None = None, bias: tuple = (),
                   num_scaleup_ranks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference of combine for an expand-mode handle, for origin ``rank``.

    ``ys[d]``: ``[M_exp_d, H]`` bf16 expanded rows of rank ``d``; ``positions[d]``: ``[M_d, k]``.
    With ``allow_multiple_reduction`` each destination first sums its rows of the token in fp32 in
    slot order and rounds to bf16 (spec 3.4 level 1), placed at its highest slot; without it every
    slot's row is placed at its own slot. Then the final fp32 sum in slot order after the bias,
    rounded once. ``recv_topk_weights[d]``: ``[M_exp_d]`` float32 (with multiple reduction only).
    Hybrid mode (``num_scaleup_ranks``, with multiple reduction): the scale-up level between the two
    (see :func:`combine`).
    """
    num_ranks = len(ys)
    L = num_experts // num_ranks
    topk = topk_idx.cpu().to(torch.int64)
    n, k = topk.shape
    H = ys[0].shape[1] if ys else 0
    out = torch.empty(n, H, dtype=torch.bfloat16)
    out_w = torch.zeros(n, k, dtype=torch.float32) if recv_topk_weights is not None else None
    lookup = [{int(g): i for i, g in enumerate(src.cpu().tolist())} for src in recv_src_idxs]
    for t, row in enumerate(topk.tolist()):
        g = rank * num_max_tokens_per_rank + t
        placed = {}  # position in slot order -> fp32 row
        for d, slots in _routes(row, L).items():
            i = lookup[d][g]
            rows = [ys[d][int(positions[d][i, s])].cpu().float() for s in slots]
            if allow_multiple_reduction:
                acc = rows[0]
                for r in rows[1:]:
                    acc = acc + r
                placed[max(slots)] = acc.to(torch.bfloat16).float()
            else:
                for s, r in zip(slots, rows):
                    placed[s] = r
            if out_w is not None:
                for s in slots:
                    out_w[t, s] = recv_topk_weights[d][int(positions[d][i, s])]
        if num_scaleup_ranks and allow_multiple_reduction:
            routes = _routes(row, L)
            placed = _reduce_hosts(placed, {max(slots): d // num_scaleup_ranks for d, slots in routes.items()})
        out[t] = _origin_sum(placed, [b[t].cpu() for b in bias], H)
    return out, out_w


def quantize_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel cast of ``[n, H]`` bf16 to ``(float8_e4m3fn [n, H], float32 [n, H/128])``.

    ``amax = max(|x|, 1e-4)`` per group; scale ``amax / 448`` and data ``x * ((1 / amax) * 448)``
    (how torch evaluates DeepEP's ``x * (448 / amax)``: reciprocal first, two roundings); with
    ``round_scale`` the scale is the next power of two at or above ``amax / 448`` and the data
    ``x * (1 / scale)``. Casting back multiplies each group by its scale.
    """
    n, H = x.shape
    xf = x.float().view(n, H // 128, 128)
    amax = xf.abs().amax(dim=2).clamp(min=1e-4)
    # a tensor divisor: torch on CUDA turns division by a Python scalar into multiplication by its
    # reciprocal, which rounds differently from the IEEE division that the CPU and the kernel do
    scale = amax / torch.full_like(amax, 448.0)
    if round_scale:
        mant, exp = torch.frexp(scale)  # scale = mant * 2^exp, mant in [0.5, 1)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(mant == 0.5, exp - 1, exp))
        mult = 1.0 / scale
    else:
        mult = amax.reciprocal() * 448.0
    data = (xf * mult[:, :, None]).view(n, H).to(torch.float8_e4m3fn)
    return data, scale.contiguous()


@dataclasses.dataclass
class RefLowLatency:
    """What rank ``rank`` receives in a low-latency dispatch, per local expert ``l`` (lists of L):

    * ``recv_x[l]``: ``[count_l, H]`` (bf16, or fp8) in V1's packed order: by source rank, then
      source token; ``recv_sf[l]``: ``[count_l, H/128]`` float32 or None
    * ``src_info[l]``, ``slots[l]``: ``[count_l]`` int64 source token and its top-k slot there
    * ``layout_range``: ``[L, R]`` int64 ``begin << 32 | count``; ``recv_count``: ``[L]`` int64
    """

    recv_x: list
    recv_sf: list | None
    src_info: list
    slots: list
    layout_range: torch.Tensor
    recv_count: torch.Tensor


def low_latency_dispatch(rank: int, xs: list, topk_idxs: list, num_experts: int, use_fp8: bool = False,
                         round_scale: bool = False) -> RefLowLatency:
    """Reference of V1's ``low_latency_dispatch`` for receiver ``rank``: one row per (token,
    expert) pair (a token with two experts on one rank arrives twice), FP8 cast per token as
    :func:`quantize_fp8`."""
    R = len(xs)
    L = num_experts // R
    out_x, out_sf, out_src, out_slot = [], [], [], []
    ranges = torch.zeros((L, R), dtype=torch.int64)
    for lo in range(L):
        e = rank * L + lo
        rows, sfs, src, slots = [], [], [], []
        begin = 0
        for s in range(R):
            topk = topk_idxs[s].cpu().to(torch.int64)
            hit = topk == e
            tok = hit.any(dim=1).nonzero().flatten()
            x = xs[s].cpu()[tok]
            if use_fp8:
                x, sf = quantize_fp8(x, round_scale)
                sfs.append(sf)
            rows.append(x)
            src.append(tok)
            slots.append(hit[tok].int().argmax(dim=1))
            ranges[lo, s] = (begin << 32) | len(tok)
            begin += len(tok)
        out_x.append(torch.cat(rows))
        out_sf.append(torch.cat(sfs) if use_fp8 else None)
        out_src.append(torch.cat(src))
        out_slot.append(torch.cat(slots))
    return RefLowLatency(out_x, out_sf if use_fp8 else None, out_src, out_slot, ranges,
                         torch.tensor([len(r) for r in out_src], dtype=torch.int64))


def ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """``[rows, G]`` power-of-two float32 scales -> ``[rows, G / 4]`` int32: each scale's biased
    exponent byte, four per word, the first in the lowest byte."""
    e = (scales.contiguous().view(torch.int32) >> 23) & 0xFF
    e = e.view(scales.shape[0], scales.shape[1] // 4, 4)
    return e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)


def low_latency_combine(rank: int, ys: list, refs: list, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """Reference of V1's ``low_latency_combine`` at origin ``rank``: ``ys[d][l]`` ``[count, H]`` bf16
    are rank ``d``'s outputs for its expert ``l``'s rows in :func:`low_latency_dispatch`'s order
    (``refs[d]``). ``out[t] = bf16(Σ_s w[t, s] * y)`` in fp32 over the valid slots in slot order,
    each product rounded to fp32 before it is added, from 0."""
    R = len(ys)
    L = num_experts // R
    topk = topk_idx.cpu().to(torch.int64)
    w = topk_weights.cpu()
    n, k = topk.shape
    H = ys[0][0].shape[1] if ys and ys[0] else 0
    out = torch.empty((n, H), dtype=torch.bfloat16)
    for t in range(n):
        acc = torch.zeros(H, dtype=torch.float32)
        for s in range(k):
            e = int(topk[t, s])
            if not 0 <= e < num_experts:
                continue
            d, lo = divmod(e, L)
            ref = refs[d]
            begin = int(ref.layout_range[lo, rank]) >> 32
            count = int(ref.layout_range[lo, rank]) & 0xFFFFFFFF
            j = begin + int((ref.src_info[lo][begin:begin + count] == t).nonzero()[0])
            acc = acc + w[t, s] * ys[d][lo][j].float()
        out[t] = acc.to(torch.bfloat16)
    return out
