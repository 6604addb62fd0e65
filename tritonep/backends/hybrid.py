"""Hybrid (hierarchical) backend across hosts, over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Ranks are host-major: rank ``r`` is on host ``r // U`` at scale-up index ``u = r % U``. A dispatch
sends each token at most once to each destination host, rail-wise: to the rank with the same
scale-up index there (stage A, the only step that crosses hosts), and that rank forwards it to
every rank of its host that hosts one of the token's experts (stage B). A receiver's rows therefore
come grouped by the source's scale-up index (``reference.source_order``), and
``psum_num_recv_tokens_per_scaleup_rank`` has ``U`` entries. Combine runs the stages backwards:
each forwarder sums the partials of its host's ranks in fp32 in top-k slot order and rounds once
(DeepEP's scale-up reduction level), and sends one partial per (token, host) back; the origin adds
them to the bias in slot order and rounds once (``reference.combine(num_scaleup_ranks=U)``). With
``allow_multiple_reduction=False`` the per-rank partials travel back unreduced.

Both stages are ``all_to_all_single`` calls over the buffer's group with non-zero sizes only
between rail peers (A) or ranks of one host (B); a record is ``[x | sf | topk_idx (int64 x k) |
weights (f32 x k) | global source index (int64)]``, so that each stage is one exchange. This is the
first, portable version: stage B goes through torch.distributed too (the symmetric heap's kernels
are to take it over inside a host). Expanded layouts: the received rows are expanded per local
expert after stage B (as the ``alltoall`` backend does); their combine first sums each token's rows
on its rank (level 1), then runs as above; with ``allow_multiple_reduction=False`` it is not
supported yet.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .. import reference
from ..layout import compute_layout
from .alltoall import (_as_bytes, _final_sum, _gather_weights, _reduce_local, finish_dispatch, pack_records,
                       unpack_records)
from .base import CombineArgs, DispatchArgs, DispatchResult


@dataclasses.dataclass
class _Stages:
    """A dispatch's routing, kept in its handle for cached dispatches and combines."""

    a_tokens: torch.Tensor  # [PA] int64: the token of each stage-A row this rank sends (by host, token)
    a_send: list  # [R] rows to each rank in stage A (non-zero only for rail peers)
    a_recv: list  # [R] rows from each rank in stage A
    fwd_topk: torch.Tensor  # [NA, k] int64: the expert ids of each record this rank forwards
    fwd_src: torch.Tensor  # [NA] int64: each forwarded record's global source index
    b_rows: torch.Tensor  # [PB] int64: the forwarded record of each stage-B row (by local rank, record)
    b_dest: torch.Tensor  # [PB] int64: the destination rank of each stage-B row
    b_send: list  # [R] rows to each rank in stage B (non-zero only inside this host)
    b_recv: list  # [R] rows from each rank in stage B


def _rank_of_slot(topk: torch.Tensor, num_experts: int, L: int) -> torch.Tensor:
    """``[n, k]`` int64: the rank that hosts each slot's expert, -1 for an empty slot."""
    valid = (topk >= 0) & (topk < num_experts)
    return torch.where(valid, topk // L, -1)


def _highest_slot(owner: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """``[rows]``: the highest slot of row ``i`` whose ``owner`` (``[rows, k]``) is ``rank[i]``,
    -1 if none. Example: owner ``[[1, 0, 1]]``, rank ``[1]`` -> ``[2]``."""
    slots = torch.arange(owner.shape[1], device=owner.device).expand_as(owner)
    return torch.where(owner == rank[:, None], slots, -1).max(dim=1).values


def _order_within(group: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """For rows with a ``group`` id and a ``pos``ition, each row's rank among its group's rows by
    ascending position (0, 1, ...). Example: groups ``[0, 0, 1, 0]``, positions ``[5, 2, 0, 7]`` ->
    ``[1, 0, 0, 2]``."""
    if group.numel() == 0:
        return group.clone()
    key = group * (int(pos.max()) + 2) + pos
    order = torch.argsort(key, stable=True)
    sorted_group = group[order]
    first = torch.searchsorted(sorted_group, sorted_group)
    out = torch.empty_like(group)
    out[order] = torch.arange(len(group), device=group.device) - first
    return out


class HybridBackend:
    name = "hybrid"
    #: NCCL all-to-all sizes are read on the host: a CUDA graph capture cannot contain them
    can_capture = False
    #: expert ids are checked on the host by the caller before a fresh dispatch
    checks_routing_on_device = False
    #: no symmetric buffer
    capacity = None

    def __init__(self, group, device: torch.device, num_scaleup_ranks: int):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.U = num_scaleup_ranks
        self.host, self.u = divmod(self.rank, self.U)
        # gloo moves host memory only: ranks sharing a GPU over a gloo group (TRITONEP_DEVICE=cuda,
        # correctness tests on one GPU) exchange through the host
        self._wire = torch.device("cpu") if dist.get_backend(group) == "gloo" else device

    def _exchange(self, rows: torch.Tensor, send: list, recv: list) -> torch.Tensor:
        out = torch.empty((sum(recv), rows.shape[1]), dtype=rows.dtype, device=self._wire)
        dist.all_to_all_single(out, rows.to(self._wire), recv, send, group=self.group)
        return out.to(self.device)

    def _counts(self, send: list) -> list:
        """Rows each rank sends this rank, from what this rank sends each (one count exchange)."""
        s = torch.tensor(send, dtype=torch.int64, device=self._wire)
        r = torch.empty_like(s)
        dist.all_to_all_single(r, s, group=self.group)
        return r.tolist()

    def _route_out(self, topk: torch.Tensor, num_experts: int):
        """Stage A's rows: this rank's tokens, by destination host then token; ``(tokens, rows to
        each rank, rows from each rank)`` (one count exchange)."""
        R, U = self.num_ranks, self.U
        owner = _rank_of_slot(topk, num_experts, num_experts // R)
        hosts = torch.zeros((topk.shape[0], R // U), dtype=torch.bool, device=self.device)
        valid = owner >= 0
        hosts[torch.nonzero(valid)[:, 0], (owner[valid] // U)] = True
        t = hosts.t().nonzero(as_tuple=True)[1]  # by host, then token
        per_host = hosts.sum(0).tolist()
        a_send = [per_host[j // U] if j % U == self.u else 0 for j in range(R)]
        return t, a_send, self._counts(a_send)

    def _route_in(self, t, a_send, a_recv, fwd_topk, fwd_src, num_experts: int) -> _Stages:
        """Stage B's rows from the records stage A brought (their expert ids): each record to every
        rank of this host that hosts one of its experts, by local rank then record (one count
        exchange)."""
        R, U = self.num_ranks, self.U
        fowner = _rank_of_slot(fwd_topk, num_experts, num_experts // R)
        local = torch.zeros((fwd_topk.shape[0], U), dtype=torch.bool, device=self.device)
        here = (fowner >= 0) & (fowner // U == self.host)
        local[torch.nonzero(here)[:, 0], fowner[here] % U] = True
        rows, dl = local.t().nonzero(as_tuple=True)[::-1]  # by local rank, then record
        per_local = local.sum(0).tolist()
        b_send = [per_local[j % U] if j // U == self.host else 0 for j in range(R)]
        return _Stages(t, a_send, a_recv, fwd_topk, fwd_src, rows, self.host * U + dl, b_send, self._counts(b_send))

    def dispatch(self, a: DispatchArgs) -> DispatchResult:
        R, T, U = self.num_ranks, a.num_max_tokens_per_rank, self.U
        L = a.num_experts // R
        k = a.topk_idx.shape[1]
        if a.quantize:  # the same cast as the symmetric kernel, done before sending
            x, sf = reference.quantize_fp8(a.x, a.round_scale)
            a = dataclasses.replace(a, x=x, sf=sf, quantize=False)
        layout = a.layout if a.layout is not None else compute_layout(a.topk_idx, a.num_experts, R, self.rank, T)
        st = a.cached.backend_state if a.cached is not None else None
        t, a_send, a_recv = (st.a_tokens, st.a_send, st.a_recv) if st else self._route_out(a.topk_idx, a.num_experts)
        fwd = self._exchange(pack_records(a, t, (self.rank * T + t)[:, None]), a_send, a_recv)  # stage A
        if st is None:  # stage B's routing from the expert ids the records brought
            _, _, fwd_topk, _, fwd_src = unpack_records(fwd, a, 0, 0, self.device, 1, ids_only=True)
            st = self._route_in(t, a_send, a_recv, fwd_topk, fwd_src[:, 0], a.num_experts)
        recv = self._exchange(fwd[st.b_rows], st.b_send, st.b_recv)  # stage B: to the local ranks
        M = recv.shape[0]
        recv_x, recv_sf, recv_topk_idx, recv_w, src = unpack_records(recv, a, self.rank * L, L, self.device, 1)
        recv_meta = torch.zeros((M, k + 2), dtype=torch.int32, device=self.device)
        recv_meta[:, 0] = src[:, 0].to(torch.int32)
        # rows by forwarder: forwarder u (rank host * U + u) forwards the sources of scale-up index u
        per_fwd = st.b_recv[self.host * U:(self.host + 1) * U]
        psum = torch.tensor(per_fwd, dtype=torch.int64, device=self.device).cumsum(0).to(torch.int32)
        return finish_dispatch(a, psum, recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, layout, st, R,
                               self.device)

    def combine(self, a: CombineArgs):
        st = a.backend_state
        R, U, T = self.num_ranks, self.U, a.num_max_tokens_per_rank
        L = a.num_experts // R
        n, k = a.topk_idx.shape
        H = a.x.shape[1]
        M = sum(st.b_recv)
        x, weights = a.x, a.topk_weights
        if a.expand:
            if not a.allow_multiple_reduction:
                raise NotImplementedError("the hybrid backend does not combine expanded rows with "
                                          "allow_multiple_reduction=False yet")
            pos = a.recv_src_metadata[:M, 2:].to(torch.int64)  # level 1: this rank's rows of each token
            x, weights = _reduce_local(x, pos), (_gather_weights(weights, pos) if weights is not None else None)
        parts = [_as_bytes(x[:M])]
        if weights is not None:
            parts.append(_as_bytes(weights[:M]))
        back = self._exchange(torch.cat(parts, dim=1), st.b_recv, st.b_send)  # stage B backwards
        if a.before_epilogue is not None:
            a.before_epilogue()
        y = back[:, :2 * H].clone(memory_format=torch.contiguous_format).view(torch.bfloat16).reshape(-1, H)
        fowner = _rank_of_slot(st.fwd_topk, a.num_experts, L)
        pos = _highest_slot(fowner[st.b_rows], st.b_dest)  # each partial at its rank's highest slot
        w = None
        if weights is not None:
            w = back[:, 2 * H:2 * H + 4 * k].clone(memory_format=torch.contiguous_format).view(torch.float32)
            w = w.reshape(-1, k)
        NA = st.fwd_topk.shape[0]
        if a.allow_multiple_reduction:  # the scale-up level: one bf16 partial per (token, host)
            j = _order_within(st.b_rows, pos)
            staged = torch.zeros((U, NA, H), dtype=torch.bfloat16, device=self.device)
            staged[j, st.b_rows] = y
            present = torch.zeros((NA, U), dtype=torch.bool, device=self.device)
            present[st.b_rows, j] = True
            rows = _final_sum(staged, present, ())
            at = torch.full((NA,), -1, dtype=torch.int64, device=self.device)
            at.scatter_reduce_(0, st.b_rows, pos, reduce="amax")
            src, owner_id = st.fwd_src, torch.full((NA,), self.host, dtype=torch.int64, device=self.device)
            if w is not None:  # each slot's weight from the rank that owns its expert
                mine = fowner[st.b_rows] == st.b_dest[:, None]
                host_w = torch.zeros((NA, k), dtype=torch.float32, device=self.device)
                host_w[st.b_rows[:, None].expand_as(mine)[mine], torch.nonzero(mine)[:, 1]] = w[mine]
                w = host_w
            send, recv = st.a_recv, st.a_send
        else:  # every rank's partial goes back on its own, grouped by the record's source
            order = torch.argsort(st.b_rows, stable=True)
            rows, at, src, owner_id = y[order], pos[order], st.fwd_src[st.b_rows[order]], st.b_dest[order]
            w = w[order] if w is not None else None
            per_record = torch.bincount(st.b_rows, minlength=NA).tolist()
            starts = [sum(st.a_recv[:s]) for s in range(R + 1)]
            send = [sum(per_record[starts[s]:starts[s + 1]]) for s in range(R)]
            recv = self._counts(send)
        parts = [_as_bytes(rows), _as_bytes(torch.stack([at, src, owner_id], dim=1))]
        if w is not None:
            parts.append(_as_bytes(w))
        got = self._exchange(torch.cat(parts, dim=1), send, recv)  # stage A backwards
        rows = got[:, :2 * H].clone(memory_format=torch.contiguous_format).view(torch.bfloat16).reshape(-1, H)
        meta = got[:, 2 * H:2 * H + 24].clone(memory_format=torch.contiguous_format).view(torch.int64).reshape(-1, 3)
        at, tokens, owner_id = meta[:, 0], meta[:, 1] - self.rank * T, meta[:, 2]
        # the origin: bias, then every partial in ascending slot order, one rounding
        j = _order_within(tokens, at)
        depth = int(j.max()) + 1 if len(j) else 1
        staged = torch.zeros((depth, n, H), dtype=torch.bfloat16, device=self.device)
        staged[j, tokens] = rows
        present = torch.zeros((n, depth), dtype=torch.bool, device=self.device)
        present[tokens, j] = True
        out = _final_sum(staged, present, a.bias)
        out_w = None
        if w is not None:
            wr = got[:, 2 * H + 24:2 * H + 24 + 4 * k].clone(memory_format=torch.contiguous_format)
            wr = wr.view(torch.float32).reshape(-1, k)
            owner = _rank_of_slot(a.topk_idx, a.num_experts, L)[tokens]
            mine = (owner >= 0) & ((owner // U if a.allow_multiple_reduction else owner) == owner_id[:, None])
            out_w = torch.zeros((n, k), dtype=torch.float32, device=self.device)
            out_w[tokens[:, None].expand_as(mine)[mine], torch.nonzero(mine)[:, 1]] = wr[mine]
        return out, out_w

    def barrier(self, sync: bool = True) -> None:
        dist.barrier(group=self.group)

    def destroy(self) -> None:
        pass
