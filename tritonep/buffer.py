"""``ElasticBuffer``: DeepEP V2's expert-parallel API over one scale-up domain.

Vocabulary: ``num_tokens`` (n, tokens this rank sends), ``hidden`` (H), ``num_topk`` (k),
``num_experts`` (E), ``num_ranks`` (R), ``num_local_experts`` (L = E / R),
``num_max_tokens_per_rank`` (T), ``num_recv_tokens`` (M).

Every method validates its input first (:mod:`tritonep.checks`) and raises
``TypeError``/``ValueError`` naming the offending values before any communication starts, so a
rejected call leaves the buffer usable; then it calls the backend and wraps the result in an
``EPHandle`` and an ``EventOverlap`` (:mod:`tritonep.streams`). Dispatch, combine, barrier and
destroy are collectives: every rank calls them in the same order.
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.distributed as dist

from . import checks, sizing, streams
from .backends import create_backend
from .backends.base import CachedLayout, CombineArgs, DispatchArgs
from .checks import topk_idx_t
from .config import KernelConfig
from .envs import BACKENDS, get_envs
from .domains import find_domains
from .eager import EagerMixin, combine_inputs, combine_key, dispatch_key
from .handle import EPHandle, EventOverlap, handle_from_dispatch, layout_of, zero_padding
from .lifetime import LifetimeMixin
from .allgather import AgrsMixin
from .engram import EngramMixin, split_bytes
from .pipeline import PipelineMixin

_buffer_ids = itertools.count(1)
#: every live buffer by its id (``tritonep.ops`` names buffers by id: operators take no objects)
LIVE_BUFFERS: "weakref.WeakValueDictionary[int, ElasticBuffer]" = weakref.WeakValueDictionary()


class ElasticBuffer(PipelineMixin, AgrsMixin, EngramMixin, LifetimeMixin, EagerMixin):
    """Symmetric communication buffer for expert-parallel dispatch and combine.

    Arguments follow DeepEP V2 (docs/api.md); those that only concern RDMA/NCCL-GIN resources
    (``sl_idx``, ``num_allocated_qps``, ``allow_hybrid_mode``, ``prefer_overlap_with_compute``) are
    accepted and ignored. tritonep additions (keyword-only):

    * ``backend``: ``"symmetric"`` (heap + Triton kernels, one host), ``"hybrid"`` (across hosts:
      each token once per destination host, then inside it), ``"alltoall"``
      (``torch.distributed.all_to_all_single``, direct) or ``None`` (``TRITONEP_BACKEND``, default
      ``auto``: symmetric inside one host, hybrid across hosts unless ``allow_hybrid_mode=False``).
    * ``num_sms``: default number of programs (SMs) per kernel when a call passes ``num_sms=0``
      (None: ``get_theoretical_num_sms`` on GPUs, 2 on CPU ranks).
    * ``config``: a :class:`tritonep.KernelConfig` of kernel choices; fields left None take the defaults
      for this group's size (docs/configuration.md). ``buffer.config`` is the resolved one. Every
      rank must pass an equal config.
    * ``num_max_recv_tokens``: the default of :meth:`dispatch`'s (outputs of a dispatch without a
      host sync smaller than the worst case; None: the worst case).
    """

    def __init__(self, group, num_bytes: int | None = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True,
                 sl_idx: int = 3, num_allocated_qps: int = 0, num_cpu_timeout_secs: float | None = None,
                 num_gpu_timeout_secs: float | None = None, explicitly_destroy: bool = False, *,
                 backend: str | None = None, num_sms: int | None = None, config: KernelConfig | None = None,
                 num_max_recv_tokens: int | None = None):
        envs = get_envs()
        self.group = group
        self.rank_idx = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        num_bytes, self.num_cpu_bytes = split_bytes(num_bytes, num_cpu_bytes)  # (Engram's host storage)
        for name, value in (("num_max_tokens_per_rank", num_max_tokens_per_rank), ("hidden", hidden),
                            ("num_topk", num_topk)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if num_bytes is not None and (not isinstance(num_bytes, int) or num_bytes <= 0
                                      or num_bytes % sizing.ALIGNMENT):
            raise ValueError(f"num_bytes ({num_bytes!r}) must be a positive multiple of {sizing.ALIGNMENT} (2 MiB)")
        backend = (backend if backend is not None else envs.TRITONEP_BACKEND).lower()
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")
        if config is not None and not isinstance(config, KernelConfig):
            raise TypeError(f"config must be a tritonep.KernelConfig, got {type(config).__name__}")
        if num_sms is not None:
            checks.check_positive_int("num_sms", num_sms)
        if num_max_recv_tokens is not None:
            checks.check_positive_int("num_max_recv_tokens", num_max_recv_tokens)
        self.num_max_recv_tokens = num_max_recv_tokens
        self.config = (config or KernelConfig()).resolve(self.num_ranks)  # (checked before any collective)

        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.hidden = hidden
        self.num_topk = num_topk
        self.use_fp8_dispatch = use_fp8_dispatch
        self.deterministic = deterministic
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.explicitly_destroy = explicitly_destroy
        self.num_cpu_timeout_secs = float(num_cpu_timeout_secs or envs.TRITONEP_CPU_TIMEOUT_SECS)
        self.num_gpu_timeout_secs = float(num_gpu_timeout_secs or envs.TRITONEP_GPU_TIMEOUT_SECS)
        self.num_allocated_qps = num_allocated_qps

        if dist.get_backend(group) == "nccl" or envs.TRITONEP_DEVICE == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        # spec 1.1-1.2: physical (hosts x ranks per host) and logical (scale-out x scale-up) domains
        domains = find_domains(group, self.device, envs.TRITONEP_SCALEUP_SIZE)
        self.num_rdma_ranks, self.num_nvlink_ranks = domains.num_rdma_ranks, domains.num_nvlink_ranks
        backend = domains.backend(backend, allow_hybrid_mode)
        self.num_scaleout_ranks, self.num_scaleup_ranks = domains.logical(backend == "hybrid")
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        if num_bytes is None:  # DeepEP's formula for these domains
            num_bytes = sizing.get_buffer_size_hint(self.num_ranks, num_max_tokens_per_rank, hidden, num_topk,
                                                    use_fp8_dispatch, allow_multiple_reduction,
                                                    self.num_scaleout_ranks, self.num_nvlink_ranks)
        self.num_bytes = num_bytes
        #: programs per kernel for ``num_sms=0``; None: get_theoretical_num_sms (GPUs), 2 (CPU ranks)
        self.default_num_sms = num_sms if num_sms is not None else (None if self.device.type == "cuda" else 2)
        self._num_sms_cache: dict = {}
        # the kernels run over one host's ranks: their defaults are those of its size
        self.config = (config or KernelConfig()).resolve(self.num_scaleup_ranks)

        self._backend = create_backend(backend, group, domains, self.device, num_bytes, num_max_tokens_per_rank,
                                       self.num_gpu_timeout_secs, self.num_cpu_timeout_secs, self.config)
        self.backend = backend
        self._id = next(_buffer_ids)
        LIVE_BUFFERS[self._id] = self
        # a kernel of an earlier call that timed out is reported at the next dispatch or combine,
        # without a sync (tritonep.status; the symmetric backend's, or the hybrid's host stage)
        owner = self._backend if hasattr(self._backend, "status_words") else getattr(self._backend, "inner", None)
        self._status_owner = owner  # (get_error_flag, clear_overflow)
        self._check_recorded = getattr(owner, "check_recorded", None)
        self._wait_stats = getattr(owner, "wait_stats", None)
        self._init_eager()
        self._destroyed = False
        if envs.TRITONEP_DEBUG and self.rank_idx == 0:
            print(f"tritonep: ElasticBuffer #{self._id}: {self.num_ranks} ranks on {self.device}, "
                  f"backend {backend}, num_bytes {num_bytes}, {self.config}")

    # -- sizing ------------------------------------------------------------------------------
    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """Collective: bytes for a buffer of this group (DeepEP's formula for its domains, spec 1.3)."""
        d = find_domains(group, torch.device("cpu"), get_envs().TRITONEP_SCALEUP_SIZE)
        return sizing.get_buffer_size_hint(d.num_ranks, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch,
                                           allow_multiple_reduction, d.logical(allow_hybrid_mode)[0], d.num_nvlink_ranks)

    def get_physical_domain_size(self) -> tuple[int, int]:  # (hosts, ranks per host), spec 1.2
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self) -> tuple[int, int]:  # (scale-out, scale-up) of the kernels
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float | None = None,
                                sm_write_gbs: float | None = None) -> int:
        """SMs (programs) a dispatch needs to keep NVLink busy, or in hybrid mode to keep up with the
        network when it is the bottleneck, from :mod:`tritonep.sm_model` (its docstring has the model
        and the measured figures it uses). ``nvlink_gbs=0``: 0.9 x the link rates ``nvidia-smi``
        reports, else a fallback; ``rdma_gbs=0``: the fastest InfiniBand port's rate, else a fallback;
        ``sm_*_gbs=None``: tritonep's measured per-SM rates (DeepEP's 200/50 describe DeepEP's
        kernels). Cached per arguments."""
        from . import sm_model

        if num_scaleout_topk:
            raise ValueError("num_scaleout_topk must be 0 (as in DeepEP V2)")
        key = (num_experts, num_topk, rdma_gbs, nvlink_gbs, sm_read_gbs, sm_write_gbs)
        if key not in self._num_sms_cache:
            if self.device.type == "cuda":
                device_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
                gbs = nvlink_gbs or sm_model.detect_nvlink_gbs(self.device.index) or sm_model.FALLBACK_NVLINK_GBS
            else:
                device_sms, gbs = 2, nvlink_gbs or sm_model.FALLBACK_NVLINK_GBS
            if self.num_scaleout_ranks > 1:
                rdma_gbs = rdma_gbs or sm_model.detect_rdma_gbs() or sm_model.FALLBACK_RDMA_GBS
            self._num_sms_cache[key] = sm_model.theoretical_num_sms(
                self.num_ranks, num_experts, num_topk, gbs, device_sms,
                sm_read_gbs or sm_model.SM_READ_GBS, sm_write_gbs or sm_model.SM_WRITE_GBS,
                self.num_scaleout_ranks, rdma_gbs)
        return self._num_sms_cache[key]

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        """DeepEP's queue-pair formula (spec 1.5); tritonep uses no queue pairs and ignores ``num_qps``."""
        qps = num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 9)
        return min(qps, self.num_allocated_qps) if self.num_allocated_qps else qps

    # -- helpers -----------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this ElasticBuffer was destroyed")

    def _resolve_num_sms(self, num_sms: int, num_experts: int = 0, num_topk: int = 0, check_only: bool = False):
        """Programs per kernel: ``num_sms``, or for 0 the constructor's default, else the model's
        answer for ``num_experts``/``num_topk`` (spec 1.5)."""
        if not isinstance(num_sms, int) or num_sms < 0:
            raise ValueError(f"num_sms must be a non-negative int, got {num_sms!r}")
        if check_only and num_sms == 0:
            return 0
        if num_sms == 0:
            if self.default_num_sms is None:
                return self.get_theoretical_num_sms(num_experts, num_topk)
            return self.default_num_sms
        if self.device.type == "cuda":
            limit = torch.cuda.get_device_properties(self.device).multi_processor_count
            if num_sms > limit:
                raise ValueError(f"num_sms ({num_sms}) exceeds this GPU's {limit} SMs")
        return num_sms

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, EPHandle):
            raise TypeError(f"handle must be an EPHandle from dispatch(), got {type(handle).__name__}")
        if handle.buffer_id != self._id:
            raise ValueError(f"handle was made by another ElasticBuffer (#{handle.buffer_id}); this is #{self._id}")

    def _check_fits(self, need: int, what: str) -> None:
        capacity = self._backend.capacity
        if capacity is not None and need > capacity:
            raise ValueError(f"this {what} needs {need} buffer bytes but the buffer has {capacity}; size it with "
                             "get_buffer_size_hint")

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts=None, num_max_tokens_per_rank=None, expert_alignment=None, num_sms: int = 0,
                 num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False, handle=None,
                 do_handle_copy: bool = True, do_cpu_sync=None, do_expand: bool = False,
                 do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False, round_scale: bool = False,
                 num_max_recv_tokens: int | None = None):
        """Send each token to every rank that hosts one of its experts.

        ``x``: ``[n, H]`` bf16, or ``(data [n, H] float8_e4m3fn, sf [n, P] float32/int32)``.
        ``topk_idx``: ``[n, k]`` ``topk_idx_t`` global expert ids, negative = empty slot.
        ``topk_weights``: ``[n, k]`` float32 or None. ``handle``: an ``EPHandle`` for cached dispatch
        (then ``topk_idx`` must be None and the layout is reused).

        tritonep addition: a buffer built with ``use_fp8_dispatch=True`` given bf16 ``x`` casts it to
        FP8 inside the dispatch kernel (per token and 128 channels, float32 scales, powers of two with
        ``round_scale=True``) and returns ``(data, scales)`` as if FP8 had been passed.

        tritonep addition: ``num_max_recv_tokens`` (default: the constructor's) bounds the outputs of a
        dispatch with ``do_cpu_sync=False``: that many rows (received tokens, or expanded rows with
        ``do_expand``) instead of the worst case (spec 2.7; :func:`tritonep.recv_capacity` turns a
        capacity factor into it). A dispatch that would receive more writes no row past them and
        every rank records the overflow: the buffer's kernels then do nothing, its next call on every
        rank raises :class:`tritonep.RecvOverflowError` (or its device flag, :meth:`get_error_flag`,
        is set, for a CUDA graph), until every rank calls :meth:`clear_overflow`. Ignored with a host
        sync (exact sizes) and by cached dispatch (the handle's sizes).

        Returns ``(recv_x [M, H] (+ sf [M, P]), recv_topk_idx [M, k] int64 (local expert id or -1),
        recv_topk_weights [M, k] float32 or None, handle, EventOverlap)``. Rows come in ascending
        global source index (source rank, then source token), every time.
        """
        if self._check_recorded is not None:
            self._check_recorded()
        # a dispatch of a kind seen before replays the launches recorded from an earlier one
        # (tritonep.eager: which kinds, and which are on by default)
        on_comm = bool(async_with_compute_stream or allocate_on_comm_stream)
        key = dispatch_key(handle is not None, x, topk_idx, topk_weights, cumulative_local_expert_recv_stats,
                           num_experts, num_max_tokens_per_rank, expert_alignment, num_sms, previous_event,
                           previous_event_before_epilogue, async_with_compute_stream, on_comm, do_cpu_sync, do_expand,
                           do_zero_padding, use_tma_aligned_col_major_sf, round_scale, do_handle_copy,
                           num_max_recv_tokens if num_max_recv_tokens is not None else self.num_max_recv_tokens)
        key = self._scoped(handle, key)
        plan = self._plan(handle, key)
        if plan is not None:
            data, sf = x if type(x) is tuple else (x, None)
            done = self._replay(plan if handle is not None else plan[0],
                                self._plan_inputs(handle, (data, sf, topk_idx, topk_weights), replay=True),
                                async_with_compute_stream, on_comm, self._rows(handle),
                                lazy_from=4 if handle is None else None)  # (a new handle's views: lazy)
            if done is not None:
                (recv_x, recv_sf, recv_topk_idx, recv_w, *made), event, host = done
                if handle is None:
                    handle = self._new_handle(plan[1], made, host)
                return (recv_x, recv_sf) if recv_sf is not None else recv_x, recv_topk_idx, recv_w, handle, event
        self._check_alive()
        compute = streams.caller_stream(self.device, self._backend.can_capture, self.backend)
        data, sf = checks.parse_x(x, self.device)
        n, H = data.shape
        quantize = self.use_fp8_dispatch and sf is None
        if quantize and H % 128:
            raise ValueError(f"FP8 dispatch casts per 128 channels: hidden ({H}) must be a multiple of 128")
        if round_scale and not quantize:
            raise ValueError("round_scale applies to bf16 input on a buffer built with use_fp8_dispatch=True")
        if do_zero_padding and not do_expand:
            raise ValueError("do_zero_padding requires do_expand=True")
        if previous_event is not None and not allocate_on_comm_stream:
            raise ValueError("previous_event requires allocate_on_comm_stream=True (as in DeepEP V2)")
        self._resolve_num_sms(num_sms, check_only=True)
        row_bytes = data.shape[1] * data.element_size()
        if handle is not None:
            self._check_handle(handle)
            checks.check_cached(handle, n, topk_idx, do_cpu_sync, dict(
                num_experts=num_experts, expert_alignment=expert_alignment,
                num_max_tokens_per_rank=num_max_tokens_per_rank))
            if bool(do_expand) != handle.do_expand:
                # DeepEP takes do_expand from the call and reads garbage if it differs from the handle's
                raise ValueError(f"do_expand={bool(do_expand)} but the handle comes from a dispatch with "
                                 f"do_expand={handle.do_expand}")
            T, E, A = handle.num_max_tokens_per_rank, handle.num_experts, handle.expert_alignment
            topk_idx = handle.topk_idx
            if topk_weights is not None:  # the ids were validated by the original dispatch: no host sync here
                checks.require_weights(topk_weights, topk_idx.shape, self.device)
            checks.check_tokens(n, T, H, row_bytes, self.hidden)
            do_cpu_sync = False
        else:
            if topk_idx is None:
                raise ValueError("dispatch needs topk_idx (or a handle for cached dispatch)")
            E = checks.check_num_experts(num_experts, self.num_ranks)
            T = num_max_tokens_per_rank if num_max_tokens_per_rank is not None else self.num_max_tokens_per_rank
            checks.check_positive_int("num_max_tokens_per_rank", T, " (pass it here or to the constructor)")
            A = checks.check_positive_int("expert_alignment", expert_alignment if expert_alignment is not None else 1)
            checks.check_tokens(n, T, H, row_bytes, self.hidden)
            do_cpu_sync = True if do_cpu_sync is None else bool(do_cpu_sync)
            if num_max_recv_tokens is not None:
                checks.check_positive_int("num_max_recv_tokens", num_max_recv_tokens)
            else:
                num_max_recv_tokens = self.num_max_recv_tokens
            if do_cpu_sync and compute is not None and torch.cuda.is_current_stream_capturing():
                raise ValueError("dispatch with do_cpu_sync=True waits on the host for the received counts, which "
                                 "a CUDA graph capture cannot contain: capture do_cpu_sync=False (worst-case "
                                 "output rows) or a cached dispatch (handle=...)")
            # Without a host sync the expert ids cannot be read on the host; the layout then treats
            # ids >= num_experts as empty slots instead (see README). A backend that checks the ids
            # on the device reads the verdict with the counts (no extra host round trip): a bad id
            # on any rank makes every rank raise before any token moves.
            checks.check_topk(topk_idx, topk_weights, n, E, self.device,
                              check_values=do_cpu_sync and not self._backend.checks_routing_on_device)
        L = E // self.num_ranks
        k = topk_idx.shape[1]
        num_sms = self._resolve_num_sms(num_sms, E, k)
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            checks.check_stats(stats, L, self.device)
        num_sf = H // 128 if quantize else (sf.shape[1] if sf is not None else 0)
        self._check_fits(sizing.dispatch_bytes(self.num_scaleup_ranks, self.num_scaleout_ranks * T,
                                               H if quantize else row_bytes, num_sf, k,
                                               expand=do_expand and handle is None), "dispatch")
        comm = self._enter(compute, previous_event, on_comm)
        try:
            cached = None
            if handle is not None:
                cached = CachedLayout(handle.psum_num_recv_tokens_per_scaleup_rank, handle.num_recv_tokens,
                                      handle.recv_src_metadata, handle.num_expanded_tokens, handle.host_psum,
                                      handle.backend_state)
            recorder, made = self._recorder(handle, key), None
            fresh = []  # tensors allocated here
            with recorder:
                res = self._backend.dispatch(DispatchArgs(
                    x=data, sf=sf, topk_idx=topk_idx, topk_weights=topk_weights,
                    layout=layout_of(handle) if handle is not None else None, num_experts=E,
                    num_max_tokens_per_rank=T, num_sms=num_sms, sf_col_major=use_tma_aligned_col_major_sf,
                    cached=cached, cpu_sync=do_cpu_sync, before_epilogue=streams.waiter(previous_event_before_epilogue),
                    expand=do_expand, expert_alignment=A, quantize=quantize, round_scale=round_scale,
                    copy_topk=handle is None and do_handle_copy,
                    recv_capacity=None if do_cpu_sync or handle is not None else num_max_recv_tokens))
                if handle is None:
                    handle = made = handle_from_dispatch(res, topk_idx, do_handle_copy, do_expand, E, A, T, num_sms,
                                                         self.num_ranks, self._id, fresh)
            # (a cached dispatch's topk_idx is the handle's: not an input of its plan)
            given = handle if cached is not None else None
            self._keep_plan(given, key, recorder,
                            self._plan_inputs(given, (data, sf, topk_idx if cached is None else None, topk_weights)),
                            res.allocations, made, self._rows(given))
            if made is not None and stats is not None:  # (a cached dispatch counts nothing: spec 2.8)
                stats += res.num_recv_tokens_per_expert
            if do_zero_padding:
                zero_padding(res, handle.psum_num_recv_tokens_per_expert, A)
        finally:
            streams.leave(comm)
        recv_x = (res.recv_x, res.recv_sf) if res.recv_sf is not None else res.recv_x
        if res.allocations is not None:
            outputs = (*res.allocations, *fresh)
        else:
            outputs = (res.recv_x, res.recv_sf, res.recv_topk_idx, res.recv_topk_weights, res.recv_src_metadata,
                       res.psum, res.num_recv_tokens_per_expert, handle.psum_num_recv_tokens_per_expert,
                       handle.topk_idx, handle.dst_buffer_slot_idx, handle.combine_slot_idx, handle.send_counts)
        event = self._finish(comm, async_with_compute_stream, outputs=outputs,
                             inputs=(data, sf, topk_idx, topk_weights, stats))
        return recv_x, res.recv_topk_idx, res.recv_topk_weights, handle, event

    # -- combine -----------------------------------------------------------------------------
    def combine(self, x, handle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, previous_event_before_epilogue=None, async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False):
        """Sum each token's rows back at its origin: ``bias_0 + bias_1 + Σ rows`` in fp32, one rounding.

        ``x``: ``[M, H]`` bf16, row ``i`` belonging to dispatched row ``i``. ``topk_weights``: ``[M, k]``
        float32 or None. ``bias``: None, ``[n, H]`` bf16, or a pair of them. Weights are *not* applied
        (as in DeepEP): scale expert outputs before combining.

        Returns ``(combined_x [n, H] bf16, combined_topk_weights [n, k] float32 or None, EventOverlap)``.
        """
        return self._combine(x, handle, topk_weights, bias, num_sms, previous_event, previous_event_before_epilogue,
                             async_with_compute_stream, allocate_on_comm_stream)

    def _combine(self, x, handle, topk_weights, bias, num_sms, previous_event, previous_event_before_epilogue,
                 async_with_compute_stream, allocate_on_comm_stream, sum_weights: bool = False):
        """:meth:`combine`; ``sum_weights``: V1's combined weights (``CombineArgs.sum_weights``)."""
        if self._check_recorded is not None:
            self._check_recorded()
        on_comm = bool(async_with_compute_stream or allocate_on_comm_stream)
        shared = self._sharing(handle)
        key = self._scoped(handle, combine_key(
            x, topk_weights, bias, num_sms, previous_event, previous_event_before_epilogue, async_with_compute_stream,
            on_comm, sum_weights, handle.num_recv_tokens if shared and not handle.do_expand else None))
        plan = self._plan(handle, key)
        if plan is not None:  # a combine seen before replays its launches (tritonep.eager)
            done = self._replay(plan, self._plan_inputs(handle, combine_inputs(x, topk_weights, bias), replay=True),
                                async_with_compute_stream, on_comm)
            if done is not None:
                (out, out_w), event, _ = done
                return out, out_w, event
        self._check_alive()
        compute = streams.caller_stream(self.device, self._backend.can_capture, self.backend)
        self._check_handle(handle)
        checks.require_tensor("x", x, 2, self.device)
        if x.dtype != torch.bfloat16:
            raise TypeError(f"combine's x must be torch.bfloat16, got {x.dtype}")
        checks.require_contiguous("x", x)
        n, k = handle.topk_idx.shape
        M, H = x.shape
        if handle.do_expand:
            if M < handle.num_expanded_tokens:
                raise ValueError(f"x has {M} rows but the handle's expanded dispatch produced "
                                 f"{handle.num_expanded_tokens}")
            if topk_weights is not None and not self.allow_multiple_reduction:
                raise ValueError("combine of expanded rows takes no topk_weights when the buffer has "
                                 "allow_multiple_reduction=False (as in DeepEP V2)")
        elif M != handle.num_recv_tokens:
            raise ValueError(f"x has {M} rows but the handle's dispatch received {handle.num_recv_tokens} tokens")
        checks.check_tokens(n, handle.num_max_tokens_per_rank, H, H * 2, self.hidden)
        if previous_event is not None and not allocate_on_comm_stream:
            raise ValueError("previous_event requires allocate_on_comm_stream=True (as in DeepEP V2)")
        if topk_weights is not None:
            checks.require_weights(topk_weights, (M,) if handle.do_expand else (M, k), self.device)
        bias = checks.parse_bias(bias, n, H, self.device)
        per_slot = handle.do_expand and not self.allow_multiple_reduction
        if self.num_scaleout_ranks == 1 or self.allow_multiple_reduction:  # (else no heap on the way)
            self._check_fits(sizing.combine_bytes(self.num_scaleup_ranks,
                                                  self.num_scaleout_ranks * handle.num_max_tokens_per_rank, H, k,
                                                  per_slot=per_slot), "combine")
        num_sms = self._resolve_num_sms(num_sms) if num_sms else handle.num_sms
        comm = self._enter(compute, previous_event, on_comm)
        recorder = self._recorder(handle, key)
        try:
            with recorder:
                out, out_w = self._backend.combine(CombineArgs(
                    x=x, topk_weights=topk_weights, bias=bias, topk_idx=handle.topk_idx, layout=layout_of(handle),
                    recv_src_metadata=handle.recv_src_metadata, psum=handle.psum_num_recv_tokens_per_scaleup_rank,
                    num_max_tokens_per_rank=handle.num_max_tokens_per_rank, num_experts=handle.num_experts,
                    num_sms=num_sms, before_epilogue=streams.waiter(previous_event_before_epilogue),
                    expand=handle.do_expand, allow_multiple_reduction=self.allow_multiple_reduction,
                    host_psum=handle.host_psum, backend_state=handle.backend_state, sum_weights=sum_weights))
            self._keep_plan(handle, key, recorder, self._plan_inputs(handle, (x, topk_weights, *bias)), (out, out_w))
        finally:
            streams.leave(comm)
        event = self._finish(comm, async_with_compute_stream, inputs=(x, topk_weights, *bias), outputs=(out, out_w))
        return out, out_w, event

    # -- streams, barrier, lifetime ----------------------------------------------------------
    def get_wait_stats(self, reset: bool = True):
        """tritonep: how long this rank's fresh dispatches waited for each peer's counts, the first
        thing a dispatch waits for (a rank that comes late to its dispatches, or runs slow, keeps
        every other rank waiting here): ``{"dispatches": int, "wait_us": [R] float (mean per
        dispatch), "slowest_rank": int or None}``, since the last reset (``reset``: start again).
        Ranks are those of the buffer's kernels (one host's ranks in hybrid mode). A host sync;
        None for a backend without kernels (``alltoall``)."""
        self._check_alive()
        return None if self._wait_stats is None else self._wait_stats(reset)

    def get_comm_stream(self):
        """The process-wide communication stream of this buffer's GPU (None on CPU ranks)."""
        return streams.comm_stream(self.device)

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded now on the current stream, to pass as ``previous_event``."""
        return streams.capture()

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True) -> None:
        """Collective: every rank's later work on this stream starts after every rank reached it.

        On GPUs the wait happens on the comm stream (``use_comm_stream``) or the current stream; the
        host returns at once unless ``with_cpu_sync``, which also raises any recorded timeout.
        CPU ranks always wait on the host. ``sequential`` is accepted for compatibility."""
        self._check_alive()
        if self.device.type != "cuda":
            self._backend.barrier(sync=True)
            return
        if with_cpu_sync:
            torch.cuda.synchronize(self.device)
        compute = streams.enter(self.device, None, order=self._order) if use_comm_stream else None
        if compute is None:
            # the barrier shares the buffer's operation numbers with its other operations: run
            # after them, even after an asynchronous dispatch the caller has not waited for
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.get_comm_stream())
            self._order.on(current)
        try:
            self._backend.barrier(sync=with_cpu_sync)
        finally:
            streams.leave(compute)
        if compute is not None:
            compute.wait_stream(self.get_comm_stream())
            self._order.set(compute)
        if with_cpu_sync:
            torch.cuda.synchronize(self.device)


__all__ = ["ElasticBuffer", "topk_idx_t"]
