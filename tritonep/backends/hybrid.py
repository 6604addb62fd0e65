"""Hybrid (hierarchical) backend across hosts: one exchange between hosts, then the host's own heap.

Ranks are host-major: rank ``r`` is on host ``h = r // U`` at scale-up index ``u = r % U`` (``S``
hosts of ``U`` ranks). A hybrid dispatch is two expert-parallel dispatches in a row:

* **stage A, between hosts** (the ``alltoall`` backend over this rank's *rail*: the ``S`` ranks of
  scale-up index ``u``, one per host, over ``torch.distributed``): rail rank ``h`` stands for host
  ``h`` and owns its ``U * L`` experts, so each token crosses to each destination host exactly
  once, to the rank with its own scale-up index there (the forwarder);
* **stage B, inside the host** (the ``symmetric`` backend over the host's ``U`` ranks: the heap and
  the Triton kernels; ``alltoall`` where the GPUs of a host cannot map each other's memory): the
  forwarder dispatches what it received to the host's ranks that own the experts. A forwarder's
  input has ``S * T`` rows, record ``h * T + t`` at row ``h * T + t`` (rows that nothing was sent to
  route nowhere), so the source index that stage B's kernels write, ``u * S * T + h * T + t``,
  names the origin ``(h * U + u) * T + t`` without a lookup.

A receiver's rows therefore come grouped by forwarder, i.e. by the source's scale-up index
(``reference.source_order``), and ``psum_num_recv_tokens_per_scaleup_rank`` has ``U`` entries.

Combine with ``allow_multiple_reduction`` runs the two backwards: stage B's combine sums each
record's partials on its forwarder (DeepEP's scale-up level: fp32 in slot order, one rounding; a
lone partial unchanged), stage A's combine adds the hosts' partials to the bias at the origin.
Without it no partial may be rounded on the way, so every rank sends its rows straight back to the
origin (the ``alltoall`` backend over the whole group: spec 3.4's table, "per-rank partials reach
the origin directly").

Every rank of the group creates the two sub-groups (:func:`host_and_rail_groups`); a rank never
maps memory of another host: the heap is made over the host's group only.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..errors import OP_RECV_OVERFLOW, RecvOverflowError
from ..layout import compute_layout
from .alltoall import AllToAllBackend
from .base import CachedLayout, CombineArgs, DispatchArgs, DispatchResult

#: (global ranks of the group, U) -> (host group, rail group); process groups live until
#: ``destroy_process_group``, so every buffer of a group shares them
_SUBGROUPS: dict = {}


def host_and_rail_groups(group, num_scaleup_ranks: int):
    """Collective over ``group``: ``(host group, rail group)`` of this rank. The host group holds the
    ``U`` ranks of this rank's host, the rail group the ``S`` ranks of its scale-up index (one per
    host), both in host-major order. Created once per group and kept."""
    ranks = dist.get_process_group_ranks(group)
    key = (tuple(ranks), num_scaleup_ranks)
    known = _SUBGROUPS.get(key)
    world = dist.distributed_c10d._world.pg_map
    if known is not None and all(g in world for g in known):
        return known
    U = num_scaleup_ranks
    host, u = divmod(dist.get_rank(group), U)
    backend = dist.get_backend(group)
    # every rank creates its host's group first, then its rail's: no rank waits on a group whose
    # members are still creating another
    host_group = dist.new_group([ranks[host * U + i] for i in range(U)], backend=backend,
                                use_local_synchronization=True)
    rail_group = dist.new_group(ranks[u::U], backend=backend, use_local_synchronization=True)
    _SUBGROUPS[key] = (host_group, rail_group)
    return host_group, rail_group


@dataclasses.dataclass
class _State:
    """A hybrid dispatch's two handles, kept in its ``EPHandle`` for cached dispatches and combines."""

    rail: CachedLayout  # stage A, as the rail's alltoall backend returned it
    rail_layout: object
    records: torch.Tensor  # [NA] int64: the input row (h * T + t) of each record the forwarder received
    fwd_topk: torch.Tensor  # [S * T, k] int64: stage B's expert ids (host-local; -1 elsewhere and on idle rows)
    inner: CachedLayout  # stage B, as the host's backend returned it
    inner_layout: object


def _cached(res: DispatchResult, host_psum) -> CachedLayout:
    rows = res.recv_src_metadata.shape[0]
    return CachedLayout(res.psum, rows, res.recv_src_metadata, res.recv_x.shape[0], host_psum, res.backend_state)


def _scatter_rows(rows: torch.Tensor | None, at: torch.Tensor, num_rows: int):
    """``[num_rows, ...]`` with ``rows[i]`` at row ``at[i]`` (the rest uninitialised); byte copies,
    so that fp8 rows move as they are."""
    if rows is None:
        return None
    out = rows.new_empty((num_rows, *rows.shape[1:]))
    out.view(torch.uint8)[at] = rows.view(torch.uint8)
    return out


class HybridBackend:
    name = "hybrid"
    #: stage A's all-to-all sizes are read on the host: a CUDA graph capture cannot contain them
    can_capture = False
    #: expert ids are checked on the host by the caller before a fresh dispatch
    checks_routing_on_device = False

    def __init__(self, group, device: torch.device, num_scaleup_ranks: int, make_host_backend):
        """``make_host_backend(host_group)``: stage B's backend over the host's ranks."""
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.U = num_scaleup_ranks
        self.S = self.num_ranks // self.U
        self.host, self.u = divmod(self.rank, self.U)
        host_group, rail_group = host_and_rail_groups(group, self.U)
        self.rail = AllToAllBackend(rail_group, device)
        self.inner = make_host_backend(host_group)
        self.direct = AllToAllBackend(group, device)  # the way back without intermediate reduction

    @property
    def capacity(self):
        """Stage B's heap bytes (its calls have ``U`` ranks of ``S * T`` tokens); None: no heap."""
        return getattr(self.inner, "capacity", None)

    def dispatch(self, a: DispatchArgs) -> DispatchResult:
        S, U, T = self.S, self.U, a.num_max_tokens_per_rank
        st = a.cached.backend_state if a.cached is not None else None
        # stage A: one row per (token, destination host), exact sizes (the forwarder routes them next)
        ra = self.rail.dispatch(dataclasses.replace(
            a, layout=st.rail_layout if st else None, cached=st.rail if st else None, sf_col_major=False,
            expand=False, expert_alignment=1, cpu_sync=True, before_epilogue=None, copy_topk=False,
            recv_capacity=None))
        if st is None:
            records = ra.recv_src_metadata[:, 0].to(torch.int64)  # h * T + t on the rail
            fwd_topk = torch.full((S * T, a.topk_idx.shape[1]), -1, dtype=torch.int64, device=self.device)
            fwd_topk[records] = ra.recv_topk_idx
        else:
            records, fwd_topk = st.records, st.fwd_topk
        # stage B: the forwarder's S * T rows to the host's ranks
        args = dataclasses.replace(
            a, x=_scatter_rows(ra.recv_x, records, S * T), sf=_scatter_rows(ra.recv_sf, records, S * T),
            topk_idx=fwd_topk, topk_weights=_scatter_rows(ra.recv_topk_weights, records, S * T),
            layout=st.inner_layout if st else None, num_experts=a.num_experts // S,
            num_max_tokens_per_rank=S * T, cached=st.inner if st else None, quantize=False, copy_topk=False)
        if st is None and not a.cpu_sync and a.recv_capacity is not None:
            rb = self._bounded_stage_b(args)
        else:
            rb = self.inner.dispatch(args)
        if st is None:
            state = _State(_cached(ra, None), ra.layout, records, fwd_topk, _cached(rb, rb.host_counts and
                                                                                     rb.host_counts[0]), rb.layout)
            meta = rb.recv_src_metadata.clone()
            q = meta[:, 0].to(torch.int64)  # u * S * T + h * T + t -> (h * U + u) * T + t
            meta[:, 0] = (((q % (S * T)) // T * U + q // (S * T)) * T + q % T).to(torch.int32)
            layout = compute_layout(a.topk_idx, a.num_experts, self.num_ranks, self.rank, T)
        else:
            state, meta, layout = st, a.cached.recv_src_metadata, a.layout
        return DispatchResult(rb.recv_x, rb.recv_sf, rb.recv_topk_idx, rb.recv_topk_weights, meta, rb.psum,
                              rb.num_recv_tokens_per_expert, rb.host_counts, layout, backend_state=state)

    def _bounded_stage_b(self, args: DispatchArgs) -> DispatchResult:
        """Stage B with outputs of ``args.recv_capacity`` rows. Only the host's ranks learn that one
        of them overflowed (the heap's kernels record it; an ``alltoall`` stage B raises): the
        verdicts go to every rank over the whole group (one small all-reduce, after a host read of
        the stage's status: a hybrid dispatch reads counts on the host anyway), every rank raises
        ``RecvOverflowError`` in the call, and a stopped heap is reset at once (every rank of the
        host recorded it alike), so the buffer stays usable."""
        over = None
        try:
            rb = self.inner.dispatch(args)
        except RecvOverflowError as e:  # (an alltoall stage B: checked over the host's ranks)
            over = (self.host * self.U + e.peer, e.rows)
        status = getattr(self.inner, "status", None)
        if over is None and status is not None:
            words = status.tolist()  # (a sync on GPUs)
            if words[0] == OP_RECV_OVERFLOW:
                over = (self.host * self.U + words[1], words[3])
        verdicts = torch.zeros(self.num_ranks, dtype=torch.int64, device=self.device)
        if over is not None:
            verdicts[over[0]] = over[1]
        dist.all_reduce(verdicts, op=dist.ReduceOp.MAX, group=self.group)
        verdicts = verdicts.tolist()
        bad = [r for r in range(self.num_ranks) if verdicts[r]]
        if not bad:
            return rb
        if over is not None and status is not None:
            self.inner.clear_overflow()
        raise RecvOverflowError(self.rank, bad[0], verdicts[bad[0]], None)

    def combine(self, a: CombineArgs):
        if not a.allow_multiple_reduction:
            return self._combine_direct(a)
        st = a.backend_state
        inner = st.inner
        y, w = self.inner.combine(dataclasses.replace(
            a, bias=(), topk_idx=st.fwd_topk, layout=st.inner_layout, recv_src_metadata=inner.recv_src_metadata,
            psum=inner.psum, num_max_tokens_per_rank=self.S * a.num_max_tokens_per_rank,
            num_experts=a.num_experts // self.S, before_epilogue=None, host_psum=inner.host_psum,
            backend_state=inner.backend_state))
        rail = st.rail
        return self.rail.combine(dataclasses.replace(
            a, x=y[st.records], topk_weights=w[st.records] if w is not None else None, layout=st.rail_layout,
            recv_src_metadata=rail.recv_src_metadata, psum=rail.psum, expand=False, host_psum=None,
            backend_state=rail.backend_state))

    def _combine_direct(self, a: CombineArgs):
        """Every rank's rows straight back to their origins over the whole group, sorted by origin
        (rows of one origin keep their order: ascending token)."""
        T = a.num_max_tokens_per_rank
        M = a.host_psum[-1] if a.host_psum else int(a.psum[-1])
        origin = a.recv_src_metadata[:M, 0].to(torch.int64) // T
        order = torch.argsort(origin, stable=True)
        psum = torch.bincount(origin, minlength=self.num_ranks).cumsum(0).to(torch.int32)
        x, w = a.x, a.topk_weights
        if not a.expand:  # expanded rows are found through the metadata's positions
            x, w = x[:M][order], (w[:M][order] if w is not None else None)
        return self.direct.combine(dataclasses.replace(
            a, x=x, topk_weights=w, recv_src_metadata=a.recv_src_metadata[:M][order], psum=psum, host_psum=None,
            backend_state=None))

    def barrier(self, sync: bool = True) -> None:
        self.inner.barrier(sync)
        dist.barrier(group=self.direct.group)

    def destroy(self) -> None:
        self.inner.destroy()
