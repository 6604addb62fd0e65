"""DeepEP V1's ``Buffer``: normal mode over tritonep's ``ElasticBuffer`` (one host or several),
low-latency mode over :mod:`tritonep.low_latency` (one host).

The serving and training frameworks call V1's API: ``get_dispatch_layout`` + ``dispatch`` +
``combine`` (Megatron's flex dispatcher, SGLang's normal mode). This module keeps V1's names,
arguments and results and runs them on an ``ElasticBuffer`` (the same heap and kernels). Where V1
differs from V2 it behaves as V1 (spec section 8):

* ``recv_topk_weights`` are zeroed in the slots whose expert is on another rank;
* without ``topk_idx`` the rows go where ``is_token_in_rank`` says;
* ``num_worst_tokens > 0``: no host sync, outputs of exactly that many rows, padding rows with
  ``recv_topk_idx = -1``, an empty per-expert list; a rank that would receive more rows raises
  ``RecvOverflowError`` on every rank (V1 would drop them silently; ``ElasticBuffer``'s
  ``num_max_recv_tokens``);
* a cached dispatch returns ``(recv_x, None, None, None, None, event)``;
* ``combine``'s ``combined_topk_weights`` is the sum over the token's destination ranks of the
  weight rows they return (a gather for rows as dispatched, whose other slots are zero);
* the handle is V1's intranode tuple ``(rank_prefix_matrix, channel_prefix_matrix,
  recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head)``; tritonep has no
  channels or send queues, so the second, third and last entries are None.

Across hosts (V1's internode mode) the rows are still ordered by source rank: the ``ElasticBuffer``
runs in direct mode (rows for the own host through its heap, the rest through torch.distributed),
not in hybrid mode, whose rows come ordered by forwarder. ``get_dispatch_layout`` returns
``num_tokens_per_rdma_rank`` (tokens per host), ``dispatch`` requires it, and the handle is V1's
internode tuple ``(is_token_in_rank, rdma_channel_prefix_matrix, gbl_channel_prefix_matrix,
recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix,
recv_gbl_rank_prefix_sum, recv_src_meta, send_rdma_head, send_nvl_head)``: the channel and head
entries are None; ``recv_rdma_rank_prefix_sum`` ``[hosts]`` counts the tokens that this rank's
peers of the same local index (V1's RDMA stage) send to this host; ``recv_gbl_rank_prefix_sum``
``[R]`` ends each source rank's rows; ``recv_src_meta`` holds each row's source token index (V1
keeps an opaque struct there).

Sizing. tritonep's heap holds every source's rows at once (``R * T`` rows, ``T`` tokens per rank),
where V1's NVLink buffer is a ring of chunks. A call uses ``T = `` the most tokens per rank that fit
``num_nvl_bytes`` (with ``num_worst_tokens``: ``ceil(num_worst_tokens / R)``), the same on every
rank without asking; a call with more tokens raises ``ValueError`` with the bytes it needs.
:meth:`Config.get_nvl_buffer_size_hint` returns enough for 4096 tokens per rank (or DeepEP's own
figure, if larger).
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist

from . import checks, sizing, streams
from .buffer import ElasticBuffer
from .handle import EventOverlap
from .legacy_config import COMBINE_CONFIGS, DISPATCH_CONFIGS, Config

class LegacyHandle(tuple):
    """V1's intranode handle ``(rank_prefix_matrix [R, R] int32, None, None, recv_src_idx [M]
    int32, is_token_in_rank [n, R] bool, None)`` or its internode one (see the module docstring);
    ``.elastic`` is the ``EPHandle`` behind it, ``.rows`` the rows its dispatch returned."""

    def __new__(cls, items, elastic, rows: int, with_topk: bool, buffer_id: int):
        obj = super().__new__(cls, items)
        obj.elastic, obj.rows, obj.with_topk, obj.buffer_id = elastic, rows, with_topk, buffer_id
        return obj


#: every live low-latency ``Buffer`` by its id (``tritonep.ops`` names buffers by id)
LIVE_LOW_LATENCY: "weakref.WeakValueDictionary[int, Buffer]" = weakref.WeakValueDictionary()


class Buffer:
    """DeepEP V1's ``Buffer`` (see the module docstring).

    Attributes as V1's: ``rank``, ``group``, ``group_size``, ``num_nvl_bytes``, ``num_rdma_bytes``,
    ``low_latency_mode``; ``Buffer.num_sms`` (class-wide, even, default 20) is accepted for V1's
    configs and otherwise unused: the kernels take their programs from the ``ElasticBuffer`` below
    (``get_theoretical_num_sms`` on GPUs)."""

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None):
        if group is None:
            raise ValueError("Buffer needs a torch.distributed group (an mpi4py comm is not supported by tritonep)"
                             if comm is not None else "Either 'group' or 'comm' must be provided.")
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or value < 0 or value % 128:
                raise ValueError(f"{name} ({value!r}) must be a non-negative multiple of 128")
        if enable_shrink and not low_latency_mode:
            raise ValueError("enable_shrink masks ranks of the low-latency calls: it needs low_latency_mode=True")
        self.rank, self.group = dist.get_rank(group), group
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.enable_shrink = low_latency_mode, enable_shrink
        self.explicitly_destroy = explicitly_destroy
        num_bytes = max(-(-num_nvl_bytes // sizing.ALIGNMENT), 1) * sizing.ALIGNMENT
        R = self.group_size
        # the combine's flag words are sized for this many tokens per rank: rows of 256 bytes at least
        self._max_tokens = max(num_bytes // (R * 256), 1)
        # rows ordered by source rank, as V1's are, on every backend: no hybrid mode (its rows come
        # by forwarder); across hosts the direct backend moves a host's rows through its heap
        self._elastic = ElasticBuffer(group, num_bytes=num_bytes, num_max_tokens_per_rank=self._max_tokens,
                                      allow_hybrid_mode=False, explicitly_destroy=True)
        #: hosts and ranks per host (V1: RDMA ranks and NVLink ranks)
        self._hosts, self._per_host = self._elastic.get_physical_domain_size()
        self._ll = None
        if low_latency_mode and self._hosts > 1:
            self._elastic.destroy()
            raise NotImplementedError("tritonep's low-latency mode runs inside one host (its heap is mapped by "
                                      f"every rank); this group spans {self._hosts} hosts")
        if low_latency_mode:
            from .low_latency import LowLatency

            ll_bytes = max(-(-num_rdma_bytes // sizing.ALIGNMENT), 1) * sizing.ALIGNMENT
            self._ll = LowLatency(group, ll_bytes, self._elastic.device, self._elastic.num_gpu_timeout_secs,
                                  id(self), shrink=enable_shrink)
            LIVE_LOW_LATENCY[id(self)] = self

    # -- V1's helpers --------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        return True  # Triton compiles for the GPU at hand: FP8 works wherever torch has it

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        if new_num_sms % 2:
            raise ValueError(f"num_sms ({new_num_sms}) must be even")
        cls.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        if num_ranks not in DISPATCH_CONFIGS:
            raise ValueError(f"no tuned config for {num_ranks} ranks (one of {sorted(DISPATCH_CONFIGS)})")
        return Config(Buffer.num_sms, *DISPATCH_CONFIGS[num_ranks])

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        if num_ranks not in COMBINE_CONFIGS:
            raise ValueError(f"no tuned config for {num_ranks} ranks (one of {sorted(COMBINE_CONFIGS)})")
        return Config(Buffer.num_sms, *COMBINE_CONFIGS[num_ranks])

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """``num_rdma_bytes`` for low-latency calls of these sizes (up to top-32): V1's formula
        (spec 8.5), or what tritonep's layout needs if that is more."""
        from .low_latency import heap_bytes

        T, s = num_max_dispatch_tokens_per_rank, hidden // 128
        dispatch_msg, combine_msg = 16 + max(2 * hidden, hidden + 4 * s), 4 * s + 2 * hidden
        send = max(T * dispatch_msg, num_experts * T * combine_msg)
        recv = max(num_experts * T * dispatch_msg, num_experts * T * combine_msg)
        signal = -(-4 * num_experts // 128) * 128
        v1 = (2 * (send + recv + signal) + 128) // 128 * 128
        return max(v1, heap_bytes(T, hidden, num_experts))

    @staticmethod
    def capture() -> EventOverlap:
        return streams.capture()

    def get_comm_stream(self):
        return self._elastic.get_comm_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size=None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A view of this rank's symmetric buffer from byte ``offset`` (``size``: a shape, else all)."""
        if use_rdma_buffer:
            raise ValueError("tritonep's Buffer has no RDMA buffer (num_rdma_bytes is accepted and unused)")
        backend = self._elastic._backend
        data = (backend.heap if hasattr(backend, "heap") else backend.local.heap).data  # (direct: the host's)
        view = data[offset:offset + (data.numel() - offset) // dtype.itemsize * dtype.itemsize].view(dtype)
        return view if size is None else view[:math.prod(size)].view(size)

    def get_error_flag(self, low_latency: bool = False) -> torch.Tensor:
        """tritonep: ``[1]`` int32 on the device, 0 while the kernels work (see
        ``ElasticBuffer.get_error_flag``): the normal-mode calls' flag, or with ``low_latency`` the
        low-latency calls' (``OP_RECV_OVERFLOW`` after ``num_max_recv_tokens_per_expert`` overflowed).
        For CUDA graphs: results of a replay that set it are invalid."""
        return self._low_latency_state().status[:1] if low_latency else self._elastic.get_error_flag()

    def clear_overflow(self) -> None:
        """tritonep: collective, after ``RecvOverflowError`` (``num_worst_tokens`` or
        ``num_max_recv_tokens_per_expert`` too small): see ``ElasticBuffer.clear_overflow``."""
        self._elastic.clear_overflow()
        if self._ll is not None:
            self._ll.clean(overflow=True)

    def destroy(self) -> None:
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs explicitly_destroy=True at construction (as in DeepEP)")
        if self._ll is not None and (self._ll.status_words.failed() or int(self._ll.status[0])):
            # a low-latency wait timed out: no barrier
            self._elastic.mark_failed()
        self._elastic.destroy()
        if self._ll is not None:
            self._ll.destroy()

    # -- layout --------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [hosts] int32 (None inside one
        host), num_tokens_per_expert [E] int32, is_token_in_rank [n, R] bool, EventOverlap)`` of
        ``topk_idx`` ``[n, k]`` (-1: no expert)."""
        _check_events(previous_event, async_finish, allocate_on_comm_stream)
        checks.require_tensor("topk_idx", topk_idx, 2, self._elastic.device)
        R = self.group_size
        E = checks.check_num_experts(num_experts, R)
        if previous_event is not None:
            previous_event.current_stream_wait()
        topk = topk_idx.to(torch.int64)
        n = topk.shape[0]
        valid = (topk >= 0) & (topk < E)
        extra = torch.where(valid, topk // (E // R), R)  # column R collects empty slots
        in_rank = torch.zeros((n, R + 1), dtype=torch.bool, device=topk.device).scatter_(1, extra, True)[:, :R]
        per_expert = torch.zeros(E + 1, dtype=torch.int32, device=topk.device)
        ones = torch.ones_like(topk, dtype=torch.int32).flatten()
        per_expert.scatter_add_(0, torch.where(valid, topk, E).flatten(), ones)
        per_host = None
        if self._hosts > 1:
            per_host = in_rank.view(n, self._hosts, self._per_host).any(dim=2).sum(0, dtype=torch.int32)
        event = streams.capture() if async_finish else EventOverlap()
        return in_rank.sum(0, dtype=torch.int32), per_host, per_expert[:E], in_rank.contiguous(), event

    # -- dispatch and combine ------------------------------------------------------------
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """V1's dispatch: ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``; rows by source rank, then source token (see the module docstring)."""
        _check_events(previous_event, async_finish, allocate_on_comm_stream)
        kw = dict(previous_event=previous_event, allocate_on_comm_stream=previous_event is not None,
                  async_with_compute_stream=async_finish)
        if handle is not None:
            self._check_handle(handle)
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("cached dispatch (handle given) takes no topk_idx or topk_weights")
            recv_x, _, _, _, event = self._elastic.dispatch(x, handle=handle.elastic, **kw)
            return _rows(recv_x, handle.rows), None, None, None, None, event
        R, dev = self.group_size, self._elastic.device
        for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                        ("num_tokens_per_expert", num_tokens_per_expert)):
            if t is None:
                raise ValueError(f"dispatch without a handle needs {name} (from get_dispatch_layout)")
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("pass topk_idx and topk_weights together, or neither")
        S = self._hosts
        if S > 1 and (num_tokens_per_rdma_rank is None or tuple(num_tokens_per_rdma_rank.shape) != (S,)):
            raise ValueError(f"across {S} hosts dispatch needs num_tokens_per_rdma_rank [{S}] (from "
                             "get_dispatch_layout)")
        data, sf = checks.parse_x(x, dev)
        n, H = data.shape
        if tuple(is_token_in_rank.shape) != (n, R) or is_token_in_rank.dtype != torch.bool:
            raise ValueError(f"is_token_in_rank must be [{n}, {R}] bool, got {list(is_token_in_rank.shape)} "
                             f"{is_token_in_rank.dtype}")
        E = checks.check_num_experts(num_tokens_per_expert.numel(), R)
        L = E // R
        if num_worst_tokens and topk_idx is None:
            raise ValueError("num_worst_tokens > 0 needs topk_idx (as in DeepEP)")
        if topk_idx is None:  # route by is_token_in_rank: one stand-in expert per destination rank
            ids = torch.where(is_token_in_rank, torch.arange(R, device=dev) * L, -1).to(checks.topk_idx_t)
        else:
            ids = topk_idx
        k = ids.shape[1]
        T = self._tokens_per_rank(n, data.shape[1] * data.element_size(), sf.shape[1] if sf is not None else 0,
                                  k, H, num_worst_tokens)
        counts = [num_tokens_per_rank, num_tokens_per_expert] + ([num_tokens_per_rdma_rank] if S > 1 else [])
        # [R, R + E (+ S)]: what each rank sends each rank, expert (and host)
        everyone = _all_gather(torch.cat([c.to(torch.int32).to(dev) for c in counts]), self.group, R)
        rank_prefix = everyone[:, :R].cumsum(0).to(torch.int32)
        kw["previous_event"] = _after_inputs(previous_event)
        recv_x, recv_topk, recv_w, h, event = self._elastic.dispatch(
            x, topk_idx=ids, topk_weights=topk_weights, num_experts=E, num_max_tokens_per_rank=T,
            expert_alignment=expert_alignment, do_cpu_sync=not num_worst_tokens,
            num_max_recv_tokens=num_worst_tokens or None, **kw)
        rows = num_worst_tokens or h.num_recv_tokens
        if topk_idx is None:
            mine = everyone[:, R + self.rank * L:R + (self.rank + 1) * L].sum(0)
            A = expert_alignment
            per_expert = [(int(c) + A - 1) // A * A for c in mine.tolist()]
        else:
            per_expert = [] if num_worst_tokens else list(h.num_recv_tokens_per_expert_list)

        def outputs():  # V1's view of the results, queued after the dispatch
            src_idx = (h.recv_src_metadata[:rows, 0] % T).to(torch.int32)
            if topk_idx is None:
                return src_idx, None, None
            topk = recv_topk
            if num_worst_tokens:  # padding rows: no expert
                valid = torch.arange(topk.shape[0], device=dev)[:, None] < h.psum_num_recv_tokens_per_scaleup_rank[-1]
                topk = torch.where(valid, topk, -1)
            # V1 zeroes the slots of other ranks' experts
            return src_idx, topk[:rows], torch.where(topk >= 0, recv_w, 0.0)[:rows]

        (src_idx, recv_topk, recv_w), event = _after(dev, event, async_finish, outputs)
        if S == 1:
            items = (rank_prefix, None, None, src_idx, is_token_in_rank, None)
        else:  # V1's internode tuple; V1's RDMA stage is this rank's peers of the same local index
            U, me = self._per_host, self.rank
            from_rail = everyone[me % U::U, R + E + me // U]  # tokens rank (h, u) sends this host
            items = (is_token_in_rank, None, None, None, from_rail.cumsum(0).to(torch.int32), None,
                     rank_prefix[:, me].contiguous(), src_idx, None, None)
        legacy = LegacyHandle(items, h, rows, topk_idx is not None, id(self))
        return _rows(recv_x, rows), recv_topk, recv_w, per_expert, legacy, event

    def combine(self, x: torch.Tensor, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """V1's combine: ``(combined_x [n, H] bf16, combined_topk_weights [n, k] float32 or None,
        event)``: ``bias_0 + bias_1 + Σ rows`` (one rounding) and the sum of the returned weight rows."""
        _check_events(previous_event, async_finish, allocate_on_comm_stream)
        self._check_handle(handle)
        h = handle.elastic
        checks.require_tensor("x", x, 2, self._elastic.device)
        if x.shape[0] != handle.rows:
            raise ValueError(f"x has {x.shape[0]} rows but the handle's dispatch returned {handle.rows}")
        if topk_weights is not None and not handle.with_topk:
            raise ValueError("topk_weights given, but the handle's dispatch had no topk_idx")
        pad = h.num_recv_tokens - handle.rows  # the rows past num_worst_tokens that the kernels may hold
        if pad > 0:
            x = torch.cat([x, x.new_zeros((pad, x.shape[1]))])
            if topk_weights is not None:
                topk_weights = torch.cat([topk_weights, topk_weights.new_zeros((pad, topk_weights.shape[1]))])
            previous_event = _after_inputs(previous_event)
        out, out_w, event = self._elastic._combine(
            x, h, topk_weights, bias, 0, previous_event, None, async_finish, previous_event is not None,
            sum_weights=True)
        return out, out_w, event

    # -- low-latency mode ----------------------------------------------------------------
    def _low_latency_state(self):
        if self._ll is None:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
        return self._ll

    def _low_latency(self):
        ll = self._low_latency_state()
        # a kernel of an earlier call that timed out or overflowed is reported here, without a sync
        ll.status_words.check(ll.rank, ll.timeout_s, "low-latency operation")
        return ll

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                             *, num_max_recv_tokens_per_expert: int | None = None):
        """V1's low-latency dispatch: ``(recv_x [L, R*T, H] (+ scales), recv_count [L] int32, handle,
        event, hook)``; see :mod:`tritonep.low_latency`. No host sync, capturable in CUDA graphs.
        With ``return_recv_hook`` only the send is queued; ``hook()`` queues the receive.

        tritonep: ``num_max_recv_tokens_per_expert=M`` (a multiple of 4; ``tritonep.recv_capacity(...,
        per_expert=True)`` from a capacity factor) gives the outputs ``M`` rows per expert instead of
        ``R*T``; if an expert of any rank would get more, every rank raises ``RecvOverflowError`` (at
        its next call on GPUs; ``get_error_flag()`` on the device) until ``clear_overflow()``."""
        from .low_latency import check_dispatch

        ll = self._low_latency()
        check_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, self.group_size, use_fp8,
                       use_ue8m0, round_scale, async_finish, return_recv_hook, cumulative_local_expert_recv_stats,
                       dispatch_wait_recv_cost_stats, ll.device, num_max_recv_tokens_per_expert)
        return ll.dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                           cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8, round_scale,
                           use_ue8m0, async_finish, return_recv_hook, num_max_recv_tokens_per_expert)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None, combine_wait_recv_cost_stats=None):
        """V1's low-latency combine: ``(combined_x [n, H] bf16, event, hook)``, the **weighted** sum
        ``Σ_s w[t, s] * y[expert(t, s)]`` (fp32 products rounded, added in slot order, one rounding)."""
        from .low_latency import check_combine

        ll = self._low_latency()
        check_combine(x, topk_idx, topk_weights, handle, id(self), use_logfmt, zero_copy, async_finish,
                      return_recv_hook, out, combine_wait_recv_cost_stats, self.group_size, ll.device)
        wait = combine_wait_recv_cost_stats
        return ll.combine(x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook, out, wait)

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """``[L, R*T, H]`` bf16 in the heap: write the expert outputs here and combine with ``zero_copy=True``."""
        return self._low_latency().next_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: reset the low-latency flags and operation numbers on every rank."""
        self._low_latency().clean()

    # -- shrink mode (enable_shrink=True): ranks left out of the low-latency calls ---------
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Leave ``rank_to_mask`` out of this rank's low-latency calls (``mask=True``) or take it back.
        A wait for a rank that times out masks it too, instead of failing: a dead rank then costs
        one timeout, not a hang. A masked rank's tokens and experts are skipped."""
        self._low_latency().update_mask(rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy the mask (``[R]`` int32, nonzero: left out) into ``mask_status``."""
        self._low_latency().query_mask(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self._low_latency().clean_mask()

    # -- helpers -------------------------------------------------------------------------
    def _check_handle(self, handle) -> None:
        if not isinstance(handle, LegacyHandle):
            raise TypeError(f"handle must be the handle a Buffer.dispatch returned, got {type(handle).__name__}")
        if handle.buffer_id != id(self):
            raise ValueError("handle was made by another Buffer")

    def _tokens_per_rank(self, n: int, row_bytes: int, num_sf: int, k: int, hidden: int, worst: int) -> int:
        """``T`` of this call: the same on every rank (see the module docstring)."""
        R = self.group_size
        per_token = max(sizing.dispatch_bytes(R, 1, row_bytes, num_sf, k), sizing.combine_bytes(R, 1, hidden, k))
        fit = min(self._elastic.num_bytes // per_token, self._max_tokens)
        T = -(-worst // R) if worst else fit
        if n > T or T > fit:
            need = max(n, T) * per_token
            raise ValueError(f"{n} tokens per rank{f' with num_worst_tokens={worst}' if worst else ''} need "
                             f"{need} bytes of num_nvl_bytes at {R} ranks, this Buffer has {self._elastic.num_bytes}"
                             + (f"; with num_worst_tokens every rank sends at most ceil({worst} / {R}) tokens"
                                if worst and n > T else ""))
        return T


def _check_events(previous_event, async_finish: bool, allocate_on_comm_stream: bool) -> None:
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise ValueError("allocate_on_comm_stream needs previous_event and async_finish (as in DeepEP V1)")


def _after_inputs(previous_event):
    """``previous_event`` moved past what this call queued on the current stream to build the inputs
    of the ``ElasticBuffer`` call (whose kernels wait for that event only): the current stream waits
    for it, then a new event; None stays None (the comm stream then waits for the current stream)."""
    if previous_event is None or streams.cuda_event(previous_event) is None:
        return previous_event
    previous_event.current_stream_wait()
    return streams.capture()


def _after(device: torch.device, event: EventOverlap, async_finish: bool, fn):
    """``fn()`` (torch work on an ``ElasticBuffer`` call's outputs) ordered after that call: on the
    current stream when it already waited, else on the comm stream after ``event``, whose outputs
    are then recorded for the current stream and a new event returned. ``(fn's result, event)``."""
    if not async_finish or device.type != "cuda":
        return fn(), event
    compute = streams.enter(device, event)
    try:
        out = fn()
    finally:
        streams.leave(compute)
    return out, streams.finish(device, True, inputs=(), outputs=[t for t in out if t is not None], compute=compute)


def _rows(recv_x, rows: int):
    """The first ``rows`` rows of ``recv_x`` (or of both tensors of an FP8 pair)."""
    if isinstance(recv_x, tuple):
        return tuple(t[:rows] for t in recv_x)
    return recv_x[:rows]


def _all_gather(t: torch.Tensor, group, R: int) -> torch.Tensor:
    """``[R, *t.shape]``: every rank's ``t`` (through the host for gloo)."""
    wire = t.cpu() if dist.get_backend(group) == "gloo" else t
    parts = [torch.empty_like(wire) for _ in range(R)]
    dist.all_gather(parts, wire, group=group)
    return torch.stack(parts).to(t.device)
