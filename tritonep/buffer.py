"""``ElasticBuffer``: DeepEP V2's expert-parallel API over one scale-up domain.

Vocabulary: ``num_tokens`` (n, tokens this rank sends), ``hidden`` (H), ``num_topk`` (k),
``num_experts`` (E), ``num_ranks`` (R), ``num_local_experts`` (L = E / R),
``num_max_tokens_per_rank`` (T), ``num_recv_tokens`` (M).

Every method validates its input first and raises ``TypeError``/``ValueError`` naming the offending
values before any communication starts, so a rejected call leaves the buffer usable. Dispatch,
combine, barrier and destroy are collectives: every rank calls them in the same order.
"""
from __future__ import annotations

import itertools
import socket
import warnings

import torch
import torch.distributed as dist

from . import sizing
from .backends.base import CachedLayout, CombineArgs, DispatchArgs
from .envs import BACKENDS, get_envs
from .handle import CompletedEvent, EPHandle, EventOverlap
from .layout import Layout

topk_idx_t = torch.int64
_buffer_ids = itertools.count(1)
#: one high-priority communication stream per device, shared by every ElasticBuffer (as in DeepEP)
_comm_streams: dict = {}
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
#: DeepEP's limits (spec 10.2); the per-source count header is sized for MAX_LOCAL_EXPERTS.
MAX_EXPERTS = 2048


def _peers_can_map(group, device: torch.device) -> bool:
    """True when every rank of ``group`` can load/store every other rank's memory."""
    me = (socket.gethostname(), device.index if device.type == "cuda" else -1)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    if len({h for h, _ in everyone}) != 1:
        return False
    ok = True
    if device.type == "cuda":
        ok = all(d == device.index or torch.cuda.can_device_access_peer(device.index, d) for _, d in everyone)
    verdicts: list = [None] * len(everyone)
    dist.all_gather_object(verdicts, ok, group=group)
    return all(verdicts)


def _require_tensor(name: str, t, ndim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but this buffer's ranks use {device}")


def _zero_padding(res, psum_per_expert: torch.Tensor, alignment: int) -> None:
    """Zero the alignment padding rows of an expand-mode result (data, scales, weights), on the device.

    Expert ``i`` owns rows ``[start_i, start_i + align(c_i))`` with ``start_i + c_i = psum[i]``;
    the rows from ``psum[i]`` to its aligned end are padding."""
    rows = res.recv_x.shape[0]
    ends = (psum_per_expert.to(torch.int64) + alignment - 1) // alignment * alignment  # aligned segment ends
    r = torch.arange(rows, device=res.recv_x.device)
    seg = torch.searchsorted(ends, r, right=True)
    filled = psum_per_expert.to(torch.int64)
    pad = (seg < len(ends)) & (r >= filled[seg.clamp(max=len(ends) - 1)])
    res.recv_x.view(torch.uint8).masked_fill_(pad[:, None], 0)
    if res.recv_sf is not None:
        res.recv_sf.masked_fill_(pad[:, None], 0)
    if res.recv_topk_weights is not None:
        res.recv_topk_weights.masked_fill_(pad, 0.0)


def _layout_of(handle: EPHandle) -> Layout:
    """The routing layout a handle carries (for combine and cached dispatch)."""
    return Layout(handle.dst_buffer_slot_idx, handle.combine_slot_idx, handle.send_counts, None)


def _cuda_event(event):
    """The ``torch.cuda.Event`` inside an ``EventOverlap``, an event, or None."""
    event = getattr(event, "event", event)
    return event if isinstance(event, torch.cuda.Event) else None


def _require_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def _require_weights(t, shape: tuple, device: torch.device) -> None:
    _require_tensor("topk_weights", t, len(shape), device)
    if t.dtype != torch.float32:
        raise TypeError(f"topk_weights must be torch.float32, got {t.dtype}")
    _require_contiguous("topk_weights", t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"topk_weights must be {list(shape)}, got {list(t.shape)}")


class ElasticBuffer:
    """Symmetric communication buffer for expert-parallel dispatch and combine.

    Arguments follow DeepEP V2 (``../spec``); those that only concern RDMA/NCCL-GIN resources
    (``sl_idx``, ``num_allocated_qps``, ``allow_hybrid_mode``, ``prefer_overlap_with_compute``) are
    accepted and ignored. tritonep additions (keyword-only):

    * ``backend``: ``"symmetric"`` (heap + Triton kernels), ``"alltoall"``
      (``torch.distributed.all_to_all_single``) or ``None`` (``TRITONEP_BACKEND``, default ``auto``:
      symmetric when every rank can map every other rank's memory).
    * ``num_sms``: default number of programs (SMs) per kernel when a call passes ``num_sms=0``.
    * ``exact_recv_alloc`` (symmetric backend; default ``TRITONEP_EXACT_RECV_ALLOC``, on): with
      ``do_cpu_sync=True``, wait for the received counts before any row moves and allocate
      exact-size outputs. Off, rows move into worst-case (``R * T`` rows) outputs while the host
      reads the counts, and the results are exact-size views of those allocations: no host round
      trip before the copy, at the cost of holding up to ``R * T`` rows per output (on the lent
      H200 pair the difference was lost in run-to-run noise; see docs/benchmarks.md).
    * ``pipelined_combine`` (symmetric backend; default ``TRITONEP_PIPELINED_COMBINE``, on) and
      ``pipelined_dispatch`` (default ``TRITONEP_PIPELINED_DISPATCH``, off): the combine / dispatch
      of non-expanded rows (BF16, or FP8 given by the caller) runs its push and its receive-side
      work (reduction / copy-out) in one launch: half the programs push rows and signal each block
      of rows, the other half handle each block as soon as it is in. Needs
      ``num_max_tokens_per_rank`` at construction (the flags are sized by it) and ``num_sms >= 2``;
      otherwise, or off, the two halves run as two launches, one after the other. On the H200 pair
      the pipelined combine was faster and the pipelined dispatch slower (its push is bound by
      the SMs pushing, and pipelining halves them); docs/benchmarks.md has the A/B.
    * ``copy_engine_min_bytes`` (symmetric backend; default ``TRITONEP_COPY_ENGINE_MIN_BYTES``, 16
      MiB): a dispatch of plain rows whose host knows the received counts (``do_cpu_sync=True``, or
      cached from such a handle) copies the peers' rows out of the receive area with the copy
      engine (one ``cudaMemcpyAsync`` per peer, 0 SMs) when they hold at least this many bytes; its
      SMs then copy only scales and metadata. A combine of plain rows in a group of at most
      ``TRITONEP_COPY_ENGINE_COMBINE_MAX_RANKS`` ranks (2) sends its rows back with the copy engine
      when a rank may send this many bytes (``(R - 1) * T * hidden * 2``), and every program
      reduces. ``-1``: never.
    """

    def __init__(self, group, num_bytes: int | None = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True,
                 sl_idx: int = 3, num_allocated_qps: int = 0, num_cpu_timeout_secs: float | None = None,
                 num_gpu_timeout_secs: float | None = None, explicitly_destroy: bool = False, *,
                 backend: str | None = None, num_sms: int | None = None, exact_recv_alloc: bool | None = None,
                 pipelined_dispatch: bool | None = None, pipelined_combine: bool | None = None,
                 copy_engine_min_bytes: int | None = None):
        envs = get_envs()
        self.group = group
        self.rank_idx = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        if num_cpu_bytes:
            raise NotImplementedError("num_cpu_bytes > 0 (Engram storage) is not supported by tritonep yet")
        for name, value in (("num_max_tokens_per_rank", num_max_tokens_per_rank), ("hidden", hidden),
                            ("num_topk", num_topk)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if num_bytes is None:
            num_bytes = sizing.get_buffer_size_hint(self.num_ranks, num_max_tokens_per_rank, hidden, num_topk,
                                                    use_fp8_dispatch, allow_multiple_reduction)
        elif not isinstance(num_bytes, int) or num_bytes <= 0 or num_bytes % sizing.ALIGNMENT:
            raise ValueError(f"num_bytes ({num_bytes!r}) must be a positive multiple of {sizing.ALIGNMENT} (2 MiB)")
        backend = (backend if backend is not None else envs.TRITONEP_BACKEND).lower()
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} must be one of {', '.join(BACKENDS)}")

        self.num_bytes = num_bytes
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
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx, self.scaleup_rank_idx = 0, self.rank_idx
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        self.num_allocated_qps = num_allocated_qps

        if dist.get_backend(group) == "nccl" or envs.TRITONEP_DEVICE == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        if backend == "auto":
            backend = "symmetric" if _peers_can_map(group, self.device) else "alltoall"
        if num_sms is not None and (not isinstance(num_sms, int) or num_sms <= 0):
            raise ValueError(f"num_sms must be a positive int, got {num_sms!r}")
        #: programs per kernel for ``num_sms=0``; None: get_theoretical_num_sms (GPUs), 2 (CPU ranks)
        self.default_num_sms = num_sms if num_sms is not None else (None if self.device.type == "cuda" else 2)
        self._num_sms_cache: dict = {}
        if backend == "symmetric":
            from .backends.symmetric import SymmetricBackend

            exact = envs.TRITONEP_EXACT_RECV_ALLOC if exact_recv_alloc is None else bool(exact_recv_alloc)
            pd = envs.TRITONEP_PIPELINED_DISPATCH if pipelined_dispatch is None else bool(pipelined_dispatch)
            pc = envs.TRITONEP_PIPELINED_COMBINE if pipelined_combine is None else bool(pipelined_combine)
            ce = envs.TRITONEP_COPY_ENGINE_MIN_BYTES if copy_engine_min_bytes is None else copy_engine_min_bytes
            if not isinstance(ce, int):
                raise ValueError(f"copy_engine_min_bytes must be an int (-1: never), got {ce!r}")
            self._backend = SymmetricBackend(group, num_bytes, self.device, self.num_gpu_timeout_secs,
                                             self.num_cpu_timeout_secs, exact_recv_alloc=exact,
                                             max_tokens=num_max_tokens_per_rank, pipelined_dispatch=pd,
                                             pipelined_combine=pc, copy_engine_min_bytes=ce)
        else:
            from .backends.alltoall import AllToAllBackend

            self._backend = AllToAllBackend(group, self.device)
        self.backend = backend
        self._id = next(_buffer_ids)
        self._destroyed = False
        if envs.TRITONEP_DEBUG and self.rank_idx == 0:
            print(f"tritonep: ElasticBuffer #{self._id}: {self.num_ranks} ranks on {self.device}, "
                  f"backend {backend}, num_bytes {num_bytes}")

    # -- sizing ------------------------------------------------------------------------------
    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """Bytes for a buffer of this group (DeepEP's formula, spec 1.3; a multiple of 2 MiB)."""
        return sizing.get_buffer_size_hint(dist.get_world_size(group), num_max_tokens_per_rank, hidden, num_topk,
                                           use_fp8_dispatch, allow_multiple_reduction)

    def get_physical_domain_size(self) -> tuple[int, int]:
        return 1, self.num_ranks

    def get_logical_domain_size(self) -> tuple[int, int]:
        return 1, self.num_ranks

    # -- helpers -----------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this ElasticBuffer was destroyed")

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float | None = None,
                                sm_write_gbs: float | None = None) -> int:
        """SMs (programs) a dispatch needs to keep NVLink busy, from :mod:`tritonep.sm_model` (its
        docstring has the model and the measured figures it uses). ``nvlink_gbs=0``: 0.9 x the link
        rates ``nvidia-smi`` reports, else 330 GB/s; ``sm_*_gbs=None``: tritonep's measured per-SM
        rates (DeepEP's 200/50 describe DeepEP's kernels). Cached per arguments."""
        from . import sm_model

        if num_scaleout_topk:
            raise ValueError("num_scaleout_topk must be 0 (tritonep has no scale-out kernels)")
        key = (num_experts, num_topk, rdma_gbs, nvlink_gbs, sm_read_gbs, sm_write_gbs)
        if key not in self._num_sms_cache:
            if self.device.type == "cuda":
                device_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
                gbs = nvlink_gbs or sm_model.detect_nvlink_gbs(self.device.index) or sm_model.FALLBACK_NVLINK_GBS
            else:
                device_sms, gbs = 2, nvlink_gbs or sm_model.FALLBACK_NVLINK_GBS
            self._num_sms_cache[key] = sm_model.theoretical_num_sms(
                self.num_ranks, num_experts, num_topk, gbs, device_sms,
                sm_read_gbs or sm_model.SM_READ_GBS, sm_write_gbs or sm_model.SM_WRITE_GBS)
        return self._num_sms_cache[key]

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

    def _parse_x(self, x):
        """``x`` as ``(data [n, H], sf [n, P] or None)`` after dtype/shape checks."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"an FP8 x must be a pair (data, scales), got {len(x)} items")
            data, sf = x
            _require_tensor("x[0] (FP8 data)", data, 2, self.device)
            if data.dtype not in _FP8_DTYPES:
                raise TypeError(f"x[0] (FP8 data) must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
            _require_tensor("x[1] (scales)", sf, 2, self.device)
            if sf.element_size() != 4:
                raise TypeError(f"x[1] (scales) must have 4-byte elements (float32 or int32), got {sf.dtype}")
            if sf.shape[0] != data.shape[0]:
                raise ValueError(f"x[1] (scales) has {sf.shape[0]} rows but x[0] has {data.shape[0]}")
        else:
            data, sf = x, None
            _require_tensor("x", data, 2, self.device)
            if data.dtype != torch.bfloat16:
                raise TypeError(f"x must be torch.bfloat16 (or an FP8 (data, scales) pair), got {data.dtype}")
        _require_contiguous("x", data)
        return data, sf

    def _check_tokens(self, n: int, T: int, hidden: int, row_bytes: int) -> None:
        if n > T:
            raise ValueError(f"x has {n} tokens, more than num_max_tokens_per_rank ({T})")
        if self.hidden and hidden != self.hidden:
            raise ValueError(f"x has hidden size {hidden}, but this buffer was built for hidden={self.hidden}")
        if row_bytes % 16:
            raise ValueError(f"a token row must be a multiple of 16 bytes; hidden={hidden} gives {row_bytes}")

    def _check_topk(self, topk_idx, topk_weights, n: int, num_experts: int, check_values: bool = True) -> None:
        _require_tensor("topk_idx", topk_idx, 2, self.device)
        if topk_idx.dtype != topk_idx_t:
            raise TypeError(f"topk_idx must be {topk_idx_t} (tritonep.topk_idx_t), got {topk_idx.dtype}")
        _require_contiguous("topk_idx", topk_idx)
        if topk_idx.shape[0] != n:
            raise ValueError(f"topk_idx has {topk_idx.shape[0]} rows but x has {n} tokens")
        if topk_idx.shape[1] < 1:
            raise ValueError("topk_idx must have at least one column")
        if topk_weights is not None:
            _require_weights(topk_weights, topk_idx.shape, self.device)
        if n == 0 or not check_values:
            return
        # One host read for both value checks (spec 2.1: any negative id is an empty slot).
        srt = topk_idx.sort(dim=1).values
        dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
        hi, has_dup = torch.stack([topk_idx.max(), dup.to(torch.int64)]).tolist()
        if hi >= num_experts:
            raise ValueError(f"topk_idx holds expert id {hi}, but num_experts is {num_experts} (ids must be < it)")
        if has_dup:
            raise ValueError("topk_idx selects the same expert twice in one row")

    def _check_num_experts(self, num_experts) -> int:
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if num_experts % self.num_ranks:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the number of ranks ({self.num_ranks})")
        if num_experts > MAX_EXPERTS or num_experts // self.num_ranks > sizing.MAX_LOCAL_EXPERTS:
            raise ValueError(f"num_experts ({num_experts}) exceeds the limits: at most {MAX_EXPERTS} experts and "
                             f"{sizing.MAX_LOCAL_EXPERTS} per rank")
        return num_experts

    # -- dispatch ----------------------------------------------------------------------------
    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts=None, num_max_tokens_per_rank=None, expert_alignment=None, num_sms: int = 0,
                 num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False, handle=None,
                 do_handle_copy: bool = True, do_cpu_sync=None, do_expand: bool = False,
                 do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False, round_scale: bool = False):
        """Send each token to every rank that hosts one of its experts.

        ``x``: ``[n, H]`` bf16, or ``(data [n, H] float8_e4m3fn, sf [n, P] float32/int32)``.
        ``topk_idx``: ``[n, k]`` ``topk_idx_t`` global expert ids, negative = empty slot.
        ``topk_weights``: ``[n, k]`` float32 or None. ``handle``: an ``EPHandle`` for cached dispatch
        (then ``topk_idx`` must be None and the layout is reused).

        tritonep addition: a buffer built with ``use_fp8_dispatch=True`` given bf16 ``x`` casts it to
        FP8 inside the dispatch kernel (per token and 128 channels, float32 scales, powers of two with
        ``round_scale=True``) and returns ``(data, scales)`` as if FP8 had been passed.

        Returns ``(recv_x [M, H] (+ sf [M, P]), recv_topk_idx [M, k] int64 (local expert id or -1),
        recv_topk_weights [M, k] float32 or None, handle, EventOverlap)``. Rows come in ascending
        global source index (source rank, then source token), every time.
        """
        self._check_alive()
        caller_stream = self._check_streams()
        data, sf = self._parse_x(x)
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
        if handle is not None:
            self._check_handle(handle)
            if topk_idx is not None:
                raise ValueError("cached dispatch (handle given) takes no topk_idx: the handle's is reused")
            if do_cpu_sync:
                raise ValueError("cached dispatch (handle given) never syncs with the CPU: do_cpu_sync must not be True")
            if cumulative_local_expert_recv_stats is not None:
                raise ValueError("cumulative_local_expert_recv_stats cannot be given with a handle")
            for name, value, expected in (("num_experts", num_experts, handle.num_experts),
                                          ("expert_alignment", expert_alignment, handle.expert_alignment),
                                          ("num_max_tokens_per_rank", num_max_tokens_per_rank,
                                           handle.num_max_tokens_per_rank)):
                if value is not None and value != expected:
                    raise ValueError(f"{name} ({value}) differs from the handle's ({expected})")
            if n != handle.topk_idx.shape[0]:
                raise ValueError(f"x has {n} tokens but the handle was made for {handle.topk_idx.shape[0]}")
            if bool(do_expand) != handle.do_expand:
                # DeepEP takes do_expand from the call and reads garbage if it differs from the handle's
                raise ValueError(f"do_expand={bool(do_expand)} but the handle comes from a dispatch with "
                                 f"do_expand={handle.do_expand}")
            T, E, A = handle.num_max_tokens_per_rank, handle.num_experts, handle.expert_alignment
            topk_idx = handle.topk_idx
            if topk_weights is not None:  # the ids were validated by the original dispatch: no host sync here
                _require_weights(topk_weights, topk_idx.shape, self.device)
            self._check_tokens(n, T, H, data.shape[1] * data.element_size())
        else:
            if topk_idx is None:
                raise ValueError("dispatch needs topk_idx (or a handle for cached dispatch)")
            E = self._check_num_experts(num_experts)
            T = num_max_tokens_per_rank if num_max_tokens_per_rank is not None else self.num_max_tokens_per_rank
            if not isinstance(T, int) or T <= 0:
                raise ValueError(f"num_max_tokens_per_rank must be a positive int, got {T!r} "
                                 "(pass it here or to the constructor)")
            A = expert_alignment if expert_alignment is not None else 1
            if not isinstance(A, int) or A <= 0:
                raise ValueError(f"expert_alignment must be a positive int, got {A!r}")
            self._check_tokens(n, T, H, data.shape[1] * data.element_size())
            do_cpu_sync = True if do_cpu_sync is None else bool(do_cpu_sync)
            if do_cpu_sync and caller_stream is not None and torch.cuda.is_current_stream_capturing():
                raise ValueError("dispatch with do_cpu_sync=True waits on the host for the received counts, which "
                                 "a CUDA graph capture cannot contain: capture do_cpu_sync=False (worst-case "
                                 "output rows) or a cached dispatch (handle=...)")
            # Without a host sync the expert ids cannot be read on the host; the layout then treats
            # ids >= num_experts as empty slots instead (see README). The symmetric backend checks
            # the ids in its layout kernel and reads the verdict with the counts (no extra host
            # round trip): a bad id on any rank makes every rank raise before any token moves.
            self._check_topk(topk_idx, topk_weights, n, E,
                             check_values=do_cpu_sync and self.backend != "symmetric")
        L = E // self.num_ranks
        k = topk_idx.shape[1]
        num_sms = self._resolve_num_sms(num_sms, E, k)
        if cumulative_local_expert_recv_stats is not None:
            s = cumulative_local_expert_recv_stats
            _require_tensor("cumulative_local_expert_recv_stats", s, 1, self.device)
            if s.dtype != torch.int32:
                raise TypeError(f"cumulative_local_expert_recv_stats must be torch.int32, got {s.dtype}")
            if s.shape[0] != L:
                raise ValueError(f"cumulative_local_expert_recv_stats must have {L} entries (local experts), "
                                 f"got {s.shape[0]}")
            _require_contiguous("cumulative_local_expert_recv_stats", s)
        need = sizing.dispatch_bytes(self.num_ranks, T, H if quantize else data.shape[1] * data.element_size(),
                                     H // 128 if quantize else (sf.shape[1] if sf is not None else 0), k,
                                     expand=do_expand and handle is None)
        if self.backend == "symmetric" and need > self.num_bytes:
            raise ValueError(f"this dispatch needs {need} buffer bytes (T={T}, H={H}, k={k}) but the buffer has "
                             f"{self.num_bytes}; size it with get_buffer_size_hint")
        compute = self._enter_comm_stream(previous_event, caller_stream)
        try:
            if handle is not None:
                layout = _layout_of(handle)
                cached = CachedLayout(handle.psum_num_recv_tokens_per_scaleup_rank, handle.num_recv_tokens,
                                      handle.recv_src_metadata, handle.num_expanded_tokens, handle.host_psum,
                                      handle.backend_state)
            else:
                layout, cached = None, None  # the backend computes the layout
            res = self._backend.dispatch(DispatchArgs(
                x=data, sf=sf, topk_idx=topk_idx, topk_weights=topk_weights, layout=layout, num_experts=E,
                num_max_tokens_per_rank=T, num_sms=num_sms, sf_col_major=use_tma_aligned_col_major_sf,
                cached=cached, cpu_sync=bool(do_cpu_sync), before_epilogue=self._waiter(previous_event_before_epilogue),
                expand=do_expand, expert_alignment=A, quantize=quantize, round_scale=round_scale,
                copy_topk=handle is None and do_handle_copy))
            layout = res.layout
            fresh = []  # tensors allocated here, on the comm stream
            if handle is None:
                unaligned = res.num_recv_tokens_per_expert
                psum_per_expert = res.psum_per_expert
                if psum_per_expert is None:
                    aligned = (unaligned + (A - 1)) // A * A
                    psum_per_expert = aligned.cumsum(0)
                    if do_expand:  # spec 2.5: start_i + c_i
                        psum_per_expert = psum_per_expert - aligned + unaligned
                    psum_per_expert = psum_per_expert.to(torch.int32)
                    fresh.append(psum_per_expert)
                if cumulative_local_expert_recv_stats is not None:
                    cumulative_local_expert_recv_stats += unaligned
                handle_topk = res.topk_idx_copy
                if handle_topk is None:
                    handle_topk = topk_idx.clone() if do_handle_copy else topk_idx
                    fresh.append(handle_topk)
            else:
                psum_per_expert = handle.psum_num_recv_tokens_per_expert
            if do_zero_padding:
                _zero_padding(res, psum_per_expert, A)
        finally:
            self._leave_comm_stream(compute)

        if handle is None:
            per_expert_list = [(c + A - 1) // A * A for c in res.host_counts[1]] if res.host_counts else []
            handle = EPHandle(
                do_expand=bool(do_expand), num_experts=E, expert_alignment=A, num_max_tokens_per_rank=T,
                num_sms=num_sms, topk_idx=handle_topk, num_recv_tokens=res.recv_src_metadata.shape[0],
                num_expanded_tokens=res.recv_x.shape[0] if do_expand else 0,
                num_recv_tokens_per_expert_list=per_expert_list,
                psum_num_recv_tokens_per_scaleup_rank=res.psum,
                psum_num_recv_tokens_per_expert=psum_per_expert,
                num_unaligned_recv_tokens_per_expert=unaligned,
                recv_src_metadata=res.recv_src_metadata, dst_buffer_slot_idx=layout.dst_buffer_slot_idx,
                combine_slot_idx=layout.combine_slot_idx, send_counts=layout.send_counts, buffer_id=self._id,
                host_psum=res.host_counts[0] if res.host_counts else None, backend_state=res.backend_state)
        recv_x = (res.recv_x, res.recv_sf) if res.recv_sf is not None else res.recv_x
        if res.allocations is not None:
            outputs = (*res.allocations, *fresh)
        else:
            outputs = (res.recv_x, res.recv_sf, res.recv_topk_idx, res.recv_topk_weights, res.recv_src_metadata,
                       res.psum, res.num_recv_tokens_per_expert, handle.psum_num_recv_tokens_per_expert,
                       handle.topk_idx, handle.dst_buffer_slot_idx, handle.combine_slot_idx, handle.send_counts)
        event = self._finish(async_with_compute_stream,
                             inputs=(data, sf, topk_idx, topk_weights, cumulative_local_expert_recv_stats),
                             outputs=outputs, compute=compute)
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
        self._check_alive()
        caller_stream = self._check_streams()
        self._check_handle(handle)
        _require_tensor("x", x, 2, self.device)
        if x.dtype != torch.bfloat16:
            raise TypeError(f"combine's x must be torch.bfloat16, got {x.dtype}")
        _require_contiguous("x", x)
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
        self._check_tokens(n, handle.num_max_tokens_per_rank, H, H * 2)
        if previous_event is not None and not allocate_on_comm_stream:
            raise ValueError("previous_event requires allocate_on_comm_stream=True (as in DeepEP V2)")
        if topk_weights is not None:
            _require_weights(topk_weights, (M,) if handle.do_expand else (M, k), self.device)
        if bias is None:
            bias = ()
        elif isinstance(bias, torch.Tensor):
            bias = (bias,)
        elif not isinstance(bias, (tuple, list)) or len(bias) not in (1, 2):
            raise ValueError("bias must be None, a tensor, or a pair of tensors")
        for i, b in enumerate(bias):
            _require_tensor(f"bias[{i}]", b, 2, self.device)
            if b.dtype != torch.bfloat16:
                raise TypeError(f"bias[{i}] must be torch.bfloat16, got {b.dtype}")
            _require_contiguous(f"bias[{i}]", b)
            if tuple(b.shape) != (n, H):
                raise ValueError(f"bias[{i}] must be [{n}, {H}], got {tuple(b.shape)}")
        per_slot = handle.do_expand and not self.allow_multiple_reduction
        need = sizing.combine_bytes(self.num_ranks, handle.num_max_tokens_per_rank, H, k, per_slot=per_slot)
        if self.backend == "symmetric" and need > self.num_bytes:
            raise ValueError(f"this combine needs {need} buffer bytes but the buffer has {self.num_bytes}")
        num_sms = self._resolve_num_sms(num_sms) if num_sms else handle.num_sms
        layout = _layout_of(handle)
        compute = self._enter_comm_stream(previous_event, caller_stream)
        try:
            out, out_w = self._backend.combine(CombineArgs(
                x=x, topk_weights=topk_weights, bias=tuple(bias), topk_idx=handle.topk_idx, layout=layout,
                recv_src_metadata=handle.recv_src_metadata, psum=handle.psum_num_recv_tokens_per_scaleup_rank,
                num_max_tokens_per_rank=handle.num_max_tokens_per_rank, num_experts=handle.num_experts,
                num_sms=num_sms, before_epilogue=self._waiter(previous_event_before_epilogue),
                expand=handle.do_expand, allow_multiple_reduction=self.allow_multiple_reduction,
                host_psum=handle.host_psum, backend_state=handle.backend_state))
        finally:
            self._leave_comm_stream(compute)
        event = self._finish(async_with_compute_stream, inputs=(x, topk_weights, *bias), outputs=(out, out_w),
                             compute=compute)
        return out, out_w, event

    # -- streams, barrier, lifetime ----------------------------------------------------------
    def get_comm_stream(self):
        """The process-wide communication stream of this buffer's GPU (None on CPU ranks)."""
        if self.device.type != "cuda":
            return None
        stream = _comm_streams.get(self.device.index)
        if stream is None:
            stream = _comm_streams[self.device.index] = torch.cuda.Stream(device=self.device, priority=-1)
        return stream

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded now on the current stream, to pass as ``previous_event``."""
        if not torch.cuda.is_available():
            return EventOverlap(CompletedEvent())
        event = torch.cuda.Event()
        event.record()
        return EventOverlap(event)

    def _check_streams(self):
        """The caller's (compute) stream, None on CPU ranks; raises if it is the comm stream. Looked
        up once per call and passed on: each lookup costs the host ~7 us."""
        if self.device.type != "cuda":
            return None
        compute = torch.cuda.current_stream(self.device)
        if compute == self.get_comm_stream():
            raise ValueError("the current stream is tritonep's communication stream; call dispatch/combine "
                             "from a compute stream (as in DeepEP V2)")
        if self.backend != "symmetric" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"the {self.backend!r} backend reads the counts on the host (NCCL all-to-all sizes), "
                             "which a CUDA graph capture cannot contain; the 'symmetric' backend can be captured")
        return compute

    def _enter_comm_stream(self, previous_event, compute=None):
        """Make the comm stream current, after ``previous_event`` (or the work of ``compute``, the
        current stream). Returns the compute stream to restore."""
        if self.device.type != "cuda":
            return None
        if compute is None:
            compute = torch.cuda.current_stream(self.device)
        comm = self.get_comm_stream()
        event = _cuda_event(previous_event)
        if event is not None:
            comm.wait_event(event)
        else:
            comm.wait_stream(compute)
        torch.cuda.set_stream(comm)
        return compute

    def _leave_comm_stream(self, compute) -> None:
        if compute is not None:
            torch.cuda.set_stream(compute)

    @staticmethod
    def _waiter(previous_event_before_epilogue):
        event = _cuda_event(previous_event_before_epilogue)
        if event is None:
            return None
        return lambda: torch.cuda.current_stream().wait_event(event)

    def _finish(self, async_with_compute_stream: bool, inputs, outputs, compute) -> EventOverlap:
        """Stream epilogue of spec 2.10: outputs are recorded on the compute stream (they were
        allocated on the comm stream); asynchronous calls also record their inputs on the comm stream
        and return its event, synchronous ones make the compute stream wait."""
        if self.device.type != "cuda":
            return EventOverlap(CompletedEvent() if async_with_compute_stream else None)
        comm = self.get_comm_stream()
        for t in outputs:
            if t is not None:
                t.record_stream(compute)
        if not async_with_compute_stream:
            compute.wait_stream(comm)
            return EventOverlap(None)
        for t in inputs:
            if t is not None:
                t.record_stream(comm)
        event = torch.cuda.Event()
        event.record(comm)
        return EventOverlap(event)

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
        compute = self._enter_comm_stream(None) if use_comm_stream else None
        if compute is None:
            # the barrier shares the buffer's operation numbers with the comm stream's operations:
            # run after them, even after an asynchronous dispatch the caller has not waited for
            torch.cuda.current_stream(self.device).wait_stream(self.get_comm_stream())
        try:
            self._backend.barrier(sync=with_cpu_sync)
        finally:
            self._leave_comm_stream(compute)
        if compute is not None:
            compute.wait_stream(self.get_comm_stream())
        if with_cpu_sync:
            torch.cuda.synchronize(self.device)

    def destroy(self) -> None:
        """Collective: barrier, then release the symmetric memory. The buffer is unusable afterwards.

        (DeepEP only allows this with ``explicitly_destroy=True``; tritonep allows it always.)
        """
        if self._destroyed:
            raise RuntimeError("this ElasticBuffer was already destroyed")
        try:
            self._backend.barrier(sync=True)
        finally:
            self._destroyed = True
            self._backend.destroy()

    def __del__(self):
        if getattr(self, "_destroyed", True):
            return
        if self.explicitly_destroy:
            warnings.warn("ElasticBuffer built with explicitly_destroy=True was never destroy()ed", ResourceWarning)
        try:
            self._backend.destroy()  # local release only: never a collective from the garbage collector
        except Exception:
            pass
