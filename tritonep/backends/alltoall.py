"""Portable backend over ``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on CPUs).

Used when peers cannot map each other's memory (ranks on several hosts, GPUs without peer
access), or when asked for (``ElasticBuffer(backend="alltoall")`` / ``TRITONEP_BACKEND``).
It produces exactly what the symmetric backend produces: the same row order (source rank, then
source token), the same metadata, and combine sums in the same fp32 order.

Each token row travels as one byte record ``[x | sf | topk_idx (int64 x k) | weights (f32 x k) |
global source index (int64) | combine slot (int64)]`` so that one all-to-all moves everything
(gloo has no bf16/fp8 all-to-all, bytes work everywhere).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import reference
from ..errors import RecvOverflowError

from ..layout import Layout, compute_layout, expert_ranks
from ..sizing import num_expanded_rows
from .base import CombineArgs, DispatchArgs, DispatchResult, new_recv_sf


@dataclasses.dataclass
class _Routes:
    """What a dispatch's handle keeps for its cached dispatches and combines: the (token, combine
    slot) of every sent row in send order (``[S]`` int64 each) and the rows per peer both ways, so
    that they neither sort nor exchange counts again (each host read of a count is a sync)."""

    tokens: torch.Tensor
    slots: torch.Tensor
    send_splits: list
    recv_splits: list


def _send_order(layout: Layout, topk_idx: torch.Tensor, num_local_experts: int, total: int | None = None):
    """(token, destination, combine slot) of every (token, destination) pair, sorted by destination
    then token. ``total``: the number of pairs when the host knows it (no sync to find them)."""
    rep = layout.dst_buffer_slot_idx >= 0
    if total is None:
        t, s = rep.nonzero(as_tuple=True)
    else:
        t, s = torch.nonzero_static(rep, size=total).unbind(1)
    d = topk_idx[t, s] // num_local_experts
    j = layout.combine_slot_idx[t, s].to(torch.int64)
    order = torch.argsort(d * max(topk_idx.shape[0], 1) + t)
    return t[order], d[order], j[order]


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append ``rows`` uninitialised rows."""
    return torch.cat([t, t.new_empty((rows, *t.shape[1:]))])


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[rows, ...]`` -> ``[rows, row_bytes]`` uint8 (zero rows included)."""
    row_bytes = t.element_size()
    for size in t.shape[1:]:
        row_bytes *= size
    if t.numel() == 0:  # an empty result can carry 0 strides, which view() rejects
        return torch.empty((t.shape[0], row_bytes), dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], row_bytes)


class AllToAllBackend:
    name = "alltoall"
    #: NCCL all-to-all sizes are read on the host: a CUDA graph capture cannot contain them
    can_capture = False
    #: expert ids are checked on the host by the caller (``ElasticBuffer``) before a fresh dispatch
    checks_routing_on_device = False
    #: no symmetric buffer: any call size fits
    capacity = None

    def __init__(self, group, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        # gloo moves host memory only: GPU ranks over a gloo group (TRITONEP_DEVICE=cuda, correctness
        # tests on one GPU) exchange through the host
        self._wire = torch.device("cpu") if dist.get_backend(group) == "gloo" else device

    def _exchange(self, rows: torch.Tensor, send_splits: list, recv_splits: list | None = None
                  ) -> tuple[torch.Tensor, list]:
        """All-to-all of ``rows`` (``send_splits`` per peer); the counts are exchanged first unless
        ``recv_splits`` is known."""
        if recv_splits is None:
            recv_splits = self._counts(send_splits)
        out = torch.empty((sum(recv_splits), rows.shape[1]), dtype=rows.dtype, device=self._wire)
        dist.all_to_all_single(out, rows.to(self._wire), recv_splits, send_splits, group=self.group)
        return out.to(self.device), recv_splits

    def _counts(self, send_splits: list) -> list:
        """Rows each rank sends this one, from what this one sends each (one exchange, one host read)."""
        send = torch.tensor(send_splits, dtype=torch.int64, device=self._wire)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def dispatch(self, a: DispatchArgs) -> DispatchResult:
        R, T = self.num_ranks, a.num_max_tokens_per_rank
        L = a.num_experts // R
        n, k = a.topk_idx.shape
        if a.quantize:  # the same cast as the symmetric kernel, done before sending
            x, sf = reference.quantize_fp8(a.x, a.round_scale)
            a = dataclasses.replace(a, x=x, sf=sf, quantize=False)
        layout = a.layout if a.layout is not None else compute_layout(
            a.topk_idx, a.num_experts, R, self.rank, T, expand=a.expand)
        routes = a.cached.backend_state if a.cached is not None else None
        if routes is not None:  # a cached dispatch of this backend's handle: same rows, same counts
            t, j = routes.tokens, routes.slots
        else:  # rows per destination first: one host read, then the order without another sync
            send_splits = layout.send_counts[:, 0].tolist()
            t, _, j = _send_order(layout, a.topk_idx, L, sum(send_splits))
            routes = _Routes(t, j, send_splits, None)
        rows = pack_records(a, t, torch.stack([self.rank * T + t, j], dim=1))
        recv, recv_splits = self._exchange(rows, routes.send_splits, routes.recv_splits)
        routes.recv_splits = recv_splits
        recv_x, recv_sf, recv_topk_idx, recv_w, src_j = unpack_records(recv, a, self.rank * L, L, self.device, 2)
        M = recv.shape[0]
        recv_meta = torch.zeros((M, k + 2), dtype=torch.int32, device=self.device)
        recv_meta[:, :2] = src_j.to(torch.int32)
        psum = torch.tensor(recv_splits, dtype=torch.int64, device=self.device).cumsum(0).to(torch.int32)
        return finish_dispatch(a, psum, recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, layout, routes, R,
                               self.device, self.group)

    def combine(self, a: CombineArgs):
        R = self.num_ranks
        L = a.num_experts // R
        n, k = a.topk_idx.shape
        H = a.x.shape[1]
        routes = a.backend_state
        if routes is not None:  # the handle's row counts: no host read of psum
            counts = routes.recv_splits
        else:
            counts = torch.diff(a.psum.to(torch.int64), prepend=a.psum.new_zeros(1).to(torch.int64)).tolist()
        M = sum(counts)
        x, weights = a.x, a.topk_weights
        pos = a.recv_src_metadata[:M, 2:].to(torch.int64) if a.expand else None
        if a.expand and not a.allow_multiple_reduction:
            return self._combine_per_slot(a, pos, counts)
        if a.expand:  # spec 3.4 level 1: this rank's rows of each token, fp32 in slot order, one rounding
            x, weights = _reduce_local(x, pos), (_gather_weights(weights, pos) if weights is not None else None)
        parts = [_as_bytes(x[:M])]
        if weights is not None:
            parts.append(_as_bytes(weights[:M]))
        rows = torch.cat(parts, dim=1)
        recv, _ = self._exchange(rows, counts, routes.send_splits if routes is not None else None)
        if a.before_epilogue is not None:
            a.before_epilogue()

        if routes is not None:
            t, j = routes.tokens, routes.slots
        else:
            t, _, j = _send_order(a.layout, a.topk_idx, L)
        back_x = recv[:, :2 * H].clone(memory_format=torch.contiguous_format).view(torch.bfloat16).reshape(-1, H)
        num_slots = min(R, k)
        staged = torch.zeros((num_slots, n, H), dtype=torch.bfloat16, device=self.device)
        staged[j, t] = back_x
        ndist = a.layout.combine_slot_idx.max(dim=1).values.to(torch.int64) + 1  # destinations per token
        present = torch.arange(num_slots, device=self.device)[None, :] < ndist[:, None]
        out = _final_sum(staged, present, a.bias)
        out_w = None
        if a.topk_weights is not None:
            back_w = recv[:, 2 * H:2 * H + 4 * k].clone(memory_format=torch.contiguous_format).view(torch.float32).reshape(-1, k)
            w_staged = torch.zeros((num_slots, n, k), dtype=torch.float32, device=self.device)
            w_staged[j, t] = back_w
            if a.sum_weights:  # V1: every destination's row, in combine-slot order from +0.0
                out_w = torch.zeros((n, k), dtype=torch.float32, device=self.device)
                for slot in range(num_slots):
                    out_w = out_w + w_staged[slot]
            else:
                cs = a.layout.combine_slot_idx.to(torch.int64)
                picked = w_staged.permute(1, 2, 0).gather(2, cs.clamp(min=0)[:, :, None])[:, :, 0]
                out_w = torch.where(cs >= 0, picked, 0.0)
        return out, out_w

    def _combine_per_slot(self, a: CombineArgs, pos: torch.Tensor, counts: list):
        """Expand mode without intermediate reduction: every (token, slot) row goes back on its own
        and the origin sums all k slots in slot order (spec 3.4)."""
        R = self.num_ranks
        L = a.num_experts // R
        n, k = a.topk_idx.shape
        H = a.x.shape[1]
        # rows leave grouped by source rank (received order), then token, then slot
        i, s = (pos >= 0).nonzero(as_tuple=True)
        src_rank = a.recv_src_metadata[i, 0].to(torch.int64) // a.num_max_tokens_per_rank
        send_splits = torch.bincount(src_rank, minlength=R).tolist()
        recv, _ = self._exchange(_as_bytes(a.x[pos[i, s]]), send_splits)
        if a.before_epilogue is not None:
            a.before_epilogue()
        topk = a.topk_idx
        valid = (topk >= 0) & (topk < a.num_experts)
        t, s = valid.nonzero(as_tuple=True)
        d = topk[t, s] // L
        order = torch.argsort((d * max(n, 1) + t) * k + s)
        staged = torch.zeros((k, n, H), dtype=torch.bfloat16, device=self.device)
        staged[s[order], t[order]] = recv.clone(memory_format=torch.contiguous_format).view(torch.bfloat16).reshape(-1, H)
        return _final_sum(staged, valid, a.bias), None

    def barrier(self, sync: bool = True) -> None:
        dist.barrier(group=self.group)

    def destroy(self) -> None:
        pass


def _final_sum(staged: torch.Tensor, present: torch.Tensor, bias: tuple) -> torch.Tensor:
    """``bf16(float(b0) + float(b1) + Σ staged[j])`` over present slots in order; without bias the
    first present slot starts the sum (a lone partial is copied bit for bit). ``staged``:
    ``[slots, n, H]`` bf16; ``present``: ``[n, slots]`` bool."""
    num_slots, n, H = staged.shape
    acc = torch.zeros((n, H), dtype=torch.float32, device=staged.device)
    started = torch.zeros(n, dtype=torch.bool, device=staged.device)
    for i, b in enumerate(bias):
        acc = b.float() if i == 0 else acc + b.float()
        started[:] = True
    for j in range(num_slots):
        here = present[:, j]
        v = staged[j].float()
        acc = torch.where(here[:, None], torch.where(started[:, None], acc + v, v), acc)
        started = started | here
    return acc.to(torch.bfloat16)


def _reduce_local(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[M, H]`` bf16: for each received token the fp32 sum of its expanded rows in slot order."""
    M, k = pos.shape
    staged = torch.zeros((k, M, x.shape[1]), dtype=torch.bfloat16, device=x.device)
    here = pos >= 0
    i, s = here.nonzero(as_tuple=True)
    staged[s, i] = x[pos[i, s]]
    return _final_sum(staged, here, ())


def _gather_weights(w: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[M, k]`` float32: the weight of each slot's expanded row, 0 where the expert is elsewhere."""
    return torch.where(pos >= 0, w[pos.clamp(min=0)], 0.0)


def expand_rows(recv_x, recv_sf, recv_w, recv_topk_idx, per_expert, alignment: int, rows: int, col_major, device):
    """Normal-mode rows -> one row per (token, local expert), experts' segments aligned (spec 2.6)."""
    L = per_expert.shape[0]
    aligned = (per_expert.to(torch.int64) + alignment - 1) // alignment * alignment
    start = torch.cumsum(aligned, 0) - aligned
    ranks = expert_ranks(recv_topk_idx, L).to(torch.int64)
    pos = torch.where(recv_topk_idx >= 0, start[recv_topk_idx.clamp(min=0)] + ranks, -1)
    i, s = (pos >= 0).nonzero(as_tuple=True)
    out_x = recv_x.new_empty((rows, recv_x.shape[1]))
    out_x[pos[i, s]] = recv_x[i]
    out_sf = None
    if recv_sf is not None:
        out_sf = new_recv_sf(rows, recv_sf.shape[1], recv_sf.dtype, device, col_major)
        out_sf[pos[i, s]] = recv_sf[i]
    out_w = None
    if recv_w is not None:
        out_w = recv_w.new_empty(rows)
        out_w[pos[i, s]] = recv_w[i, s]
    return out_x, out_sf, out_w, pos


def pack_records(a: DispatchArgs, tokens: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """``[rows, bytes]`` uint8: for each token of ``tokens``, ``[x | sf | topk_idx (int64 x k) |
    weights (f32 x k) | tail (int64 columns)]``, so that one exchange moves everything (gloo has no
    bf16/fp8 all-to-all; bytes work everywhere)."""
    parts = [_as_bytes(a.x[tokens])]
    if a.sf is not None:
        parts.append(_as_bytes(a.sf[tokens]))
    parts.append(_as_bytes(a.topk_idx[tokens]))
    if a.topk_weights is not None:
        parts.append(_as_bytes(a.topk_weights[tokens]))
    parts.append(_as_bytes(tail))
    return torch.cat(parts, dim=1)


def unpack_records(recv: torch.Tensor, a: DispatchArgs, first_expert: int, num_local_experts: int, device,
                   tail_cols: int, ids_only: bool = False):
    """:func:`pack_records` backwards: ``(recv_x [M, H], recv_sf [M, P] or None, recv_topk_idx
    [M, k] (local expert ids, -1 elsewhere), recv_topk_weights [M, k] or None, tail [M, tail_cols]
    int64)``; this rank's experts are ``first_expert ...`` (``num_local_experts`` of them).
    ``ids_only``: ``(None, None, the global expert ids [M, k], None, tail)``, nothing else copied."""
    M, H, k = recv.shape[0], a.x.shape[1], a.topk_idx.shape[1]
    off = 0

    def take(nbytes: int, dtype: torch.dtype, cols: int) -> torch.Tensor:
        nonlocal off
        # clone: a one-row slice counts as contiguous yet keeps the record stride
        out = recv[:, off:off + nbytes].clone(memory_format=torch.contiguous_format).view(dtype).reshape(M, cols)
        off += nbytes
        return out

    if ids_only:
        off = H * a.x.element_size() + (a.sf.shape[1] * 4 if a.sf is not None else 0)
        ids = take(8 * k, torch.int64, k)
        off += 4 * k if a.topk_weights is not None else 0
        return None, None, ids, None, take(8 * tail_cols, torch.int64, tail_cols)
    recv_x = take(H * a.x.element_size(), a.x.dtype, H)
    recv_sf = None
    if a.sf is not None:
        P = a.sf.shape[1]
        recv_sf = new_recv_sf(M, P, a.sf.dtype, device, a.sf_col_major)
        recv_sf.copy_(take(P * 4, a.sf.dtype, P))
    ids = take(8 * k, torch.int64, k)
    local = ids - first_expert
    recv_topk_idx = torch.where((ids >= 0) & (local >= 0) & (local < num_local_experts), local, -1)
    recv_w = take(4 * k, torch.float32, k) if a.topk_weights is not None else None
    return recv_x, recv_sf, recv_topk_idx, recv_w, take(8 * tail_cols, torch.int64, tail_cols)


def _capacity(a: DispatchArgs, M: int, per_expert, R: int, T: int, k: int, L: int, group, device) -> int | None:
    """The outputs' rows when ``a.recv_capacity`` is below the worst case (else None), after every
    rank learned whether every rank's rows fit; raises ``RecvOverflowError`` on every rank if not."""
    if a.cached is not None or a.cpu_sync or a.recv_capacity is None:
        return None
    cap = a.recv_capacity
    if a.expand:
        A = a.expert_alignment
        worst = num_expanded_rows(None, R * T, k, L, A)
        need = sum((c + A - 1) // A * A for c in per_expert.tolist()) if cap < worst else 0
    else:
        worst, need = R * T, M
    if cap >= worst:
        return None
    over = torch.zeros(R, dtype=torch.int64, device=device)
    over[dist.get_rank(group)] = need if need > cap else 0
    dist.all_reduce(over, group=group)
    over = over.tolist()
    bad = [r for r in range(R) if over[r]]
    if bad:
        raise RecvOverflowError(dist.get_rank(group), bad[0], over[bad[0]], None)
    return cap


def finish_dispatch(a: DispatchArgs, psum, recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, layout, state,
                    num_ranks: int, device, group=None) -> DispatchResult:
    """The received rows (``M`` of them, normal layout; ``psum`` by group) as the symmetric backend
    returns them: per-expert counts (with the group counts, one host read when the dispatch syncs),
    expanded per local expert with ``a.expand`` (positions into ``recv_meta[:, 2:]``), and worst
    case ``R * T`` rows without a host sync (and for a cached dispatch of such a handle). ``state``:
    what the backend keeps in the handle. With ``a.recv_capacity`` below the worst case the outputs
    have that many rows, and if any rank needs more every rank raises ``RecvOverflowError`` here
    (one small all-reduce over ``group``: the host knows the counts, nothing is recorded)."""
    M, k = recv_meta.shape[0], recv_meta.shape[1] - 2
    R, T, L = num_ranks, a.num_max_tokens_per_rank, a.num_experts // num_ranks
    per_expert = torch.bincount(recv_topk_idx[recv_topk_idx >= 0], minlength=L).to(torch.int32)
    host_counts = None
    if a.cached is None and a.cpu_sync:  # one host read for both
        both = torch.cat([psum, per_expert]).tolist()
        host_counts = (both[:len(psum)], both[len(psum):])
    cap = _capacity(a, M, per_expert, R, T, k, L, group, device)
    if a.expand:
        rows = (a.cached.num_expanded_tokens if a.cached else cap if cap is not None else
                num_expanded_rows(host_counts[1] if host_counts else None, R * T, k, L, a.expert_alignment))
        recv_x, recv_sf, recv_w, pos = expand_rows(recv_x, recv_sf, recv_w, recv_topk_idx, per_expert,
                                                   a.expert_alignment, rows, a.sf_col_major, device)
        recv_meta[:, 2:] = pos.to(torch.int32)
        recv_topk_idx = None
    # expanded outputs already have their final row count
    rows_out = R * T if (a.cached is None and not a.cpu_sync) else (a.cached.num_recv_tokens if a.cached else M)
    if cap is not None and not a.expand:
        rows_out = cap
    if rows_out > M:
        recv_meta = _pad(recv_meta, rows_out - M)
        if not a.expand:
            recv_x, recv_topk_idx = _pad(recv_x, rows_out - M), _pad(recv_topk_idx, rows_out - M)
            recv_w = _pad(recv_w, rows_out - M) if recv_w is not None else None
            if recv_sf is not None:
                padded = new_recv_sf(rows_out, recv_sf.shape[1], recv_sf.dtype, device, a.sf_col_major)
                padded[:M] = recv_sf
                recv_sf = padded
    if a.before_epilogue is not None:
        a.before_epilogue()
    return DispatchResult(recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, psum,
                          None if a.cached else per_expert, host_counts, layout, backend_state=state)
