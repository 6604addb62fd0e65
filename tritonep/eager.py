"""The short path of eager dispatch and combine (host time per call), for ``ElasticBuffer``.

A cached dispatch or a combine whose handle already saw calls of the same kind (inputs of the
same shapes, strides, dtypes and alignment, the same options; see :func:`dispatch_key` and
:func:`combine_key`), or a fresh dispatch without CPU sync of a kind the buffer saw, skips
validation, the backend's Python and Triton's launch path: it replays the launches recorded from
an earlier call (:mod:`tritonep.replay`) with the new tensors' addresses, and a fresh dispatch
gets a new handle whose tensors the replay allocated. The recorded call was validated in full, and
everything the checks read is in the key, so a replayed call is one that the full path would
accept and run the same way (a fresh dispatch without CPU sync never reads the expert ids on the
host). A synced dispatch's plan pauses at the count read and sizes its outputs by the counts.
Plans of cached calls are shared between handles of one kind (:func:`handle_kind`), so that a
training step's new handle replays too; those of fresh dispatches live on the buffer.
``_replay_synced`` and ``_share_plans`` turn those two off (per-handle plans then live on the
handle, ``EPHandle.plans``), for comparison and tests. Only the symmetric backend on GPUs
replays (CPU ranks run kernels in the interpreter: nothing compiled to launch).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from . import streams
from .recording import Stale
from .handle import EPHandle, EventOverlap, host_fields
from .replay import LazyView

try:
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # (a torch built without CUDA)
    _raw_stream = None


#: plans kept per handle, and of fresh dispatches per buffer (one per kind of call): a caller
#: whose inputs change kind every call records no more than this many
MAX_PLANS = 16
#: the tensors of a fresh dispatch's handle, which its replays rebuild
HANDLE_TENSORS = ("topk_idx", "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
                  "num_unaligned_recv_tokens_per_expert", "recv_src_metadata", "dst_buffer_slot_idx",
                  "combine_slot_idx", "send_counts")
NO_RECORDING = contextlib.nullcontext()
#: recordings of one kind of call that may fail (e.g. the first synced dispatch of a buffer
#: allocates its pinned count words) before that kind takes the full path without recording.
#: The first call of a kind is never recorded: a handle used once (a training step's combine of
#: its fresh dispatch) pays nothing for a plan it would not use.
RECORD_TRIES = 2


class ReplayedHandle(EPHandle):
    """The handle of a replayed fresh dispatch: its tensors that view the dispatch's layout words
    are made on first use (each view is a torch call of host time; the plans shared between handles
    read only their addresses, :meth:`EagerMixin._plan_inputs`)."""

    def raw(self, name: str):
        """The tensor ``name``, or its :class:`tritonep.replay.LazyView` if nothing used it yet."""
        return self.__dict__["_lazy"][name]


def _lazy_field(name: str) -> property:
    def get(self):
        lazy = self.__dict__["_lazy"]
        value = lazy[name]
        if type(value) is LazyView:
            value = lazy[name] = value.make()
        return value

    def set(self, value):  # (dataclasses.replace builds a new one through __init__)
        self.__dict__.setdefault("_lazy", {})[name] = value

    return property(get, set)


for _name in HANDLE_TENSORS:
    setattr(ReplayedHandle, _name, _lazy_field(_name))


def _sig(t):
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


def _sig_rows_free(t):
    """:func:`_sig` without the row count (a combine whose rows follow the handle)."""
    if t is None:
        return None
    return (t.shape[1:], t.stride(), t.dtype, t.device, t.data_ptr() & 15)


def handle_kind(handle) -> tuple:
    """What plans shared between handles (``_share_plans``) require of a handle: everything the
    full path reads from it except its tensors (plan inputs) and, for plain rows, its received row
    count (the outputs are sized by it). Kept on the handle after the first call (``_kind``): a
    handle's fields do not change."""
    kind = handle.__dict__.get("_kind")
    if kind is None:
        rows = (handle.num_recv_tokens, handle.num_expanded_tokens) if handle.do_expand else None
        topk = handle.raw("topk_idx") if type(handle) is ReplayedHandle else handle.topk_idx
        kind = handle._kind = (handle.do_expand, handle.num_experts, handle.expert_alignment,
                               handle.num_max_tokens_per_rank, handle.num_sms, tuple(topk.shape), topk.dtype,
                               handle.host_psum is None, handle.backend_state is None, rows)
    return kind


def dispatch_key(cached: bool, x, topk_idx, topk_weights, stats, num_experts, num_max_tokens_per_rank,
                 expert_alignment, num_sms, previous_event, previous_event_before_epilogue, async_op, on_comm,
                 do_cpu_sync, do_expand, do_zero_padding, col_major_sf, round_scale, do_handle_copy,
                 num_max_recv_tokens=None):
    """The plan key of a cached dispatch (``cached``) or of a fresh one, or None where the call
    takes the full path every time (events to wait for, statistics, zero padding, arguments of
    unexpected types)."""
    if (previous_event is not None or previous_event_before_epilogue is not None or stats is not None
            or do_zero_padding or (topk_idx is None) != cached):
        return None
    data, sf = x if type(x) is tuple and len(x) == 2 else (x, None)
    if not isinstance(data, torch.Tensor) or not all(t is None or isinstance(t, torch.Tensor)
                                                     for t in (sf, topk_idx, topk_weights)):
        return None
    return ("dispatch", _sig(data), _sig(sf), _sig(topk_idx), _sig(topk_weights), num_experts,
            num_max_tokens_per_rank, expert_alignment, num_sms, async_op, on_comm, do_cpu_sync, do_expand,
            col_major_sf, round_scale, bool(do_handle_copy) or cached, None if cached else num_max_recv_tokens)


_TOPK, _CPU_SYNC, _EXPAND = 3, 11, 12  # where dispatch_key keeps topk_idx's signature, do_cpu_sync, do_expand


def describe_key(key: tuple) -> str:
    """A plan key in words (for reports): ``"combine"``, or ``"cached"``, ``"no-sync"`` or
    ``"synced"`` ``" dispatch"``, with ``", expanded"`` for an expanded one."""
    if key[0] == "combine":
        return "combine"
    kind = "cached" if key[_TOPK] is None else "no-sync" if key[_CPU_SYNC] is False else "synced"
    return f"{kind} dispatch" + (", expanded" if key[_EXPAND] else "")


def combine_key(x, topk_weights, bias, num_sms, previous_event, previous_event_before_epilogue, async_op, on_comm,
                sum_weights, rows=None):
    """The plan key of a combine (as :func:`dispatch_key`); its inputs are ``(x, topk_weights, *bias)``.
    ``rows``: the handle's received rows, when plans are shared between handles: x (and the
    weights) must have that many, and the key leaves the number out."""
    if previous_event is not None or previous_event_before_epilogue is not None or not isinstance(x, torch.Tensor):
        return None
    if not (topk_weights is None or isinstance(topk_weights, torch.Tensor)):
        return None
    biases = (bias,) if isinstance(bias, torch.Tensor) else (() if bias is None else bias)
    if type(biases) not in (tuple, list) or len(biases) > 2 or not all(isinstance(b, torch.Tensor) for b in biases):
        return None
    sig = _sig
    if rows is not None:  # (no combine kernel takes the row count: only the check does)
        if x.dim() != 2 or x.shape[0] != rows or (topk_weights is not None and topk_weights.shape[0] != rows):
            return None
        sig = _sig_rows_free
    return ("combine", sig(x), sig(topk_weights), tuple(map(_sig, biases)), num_sms, async_op, on_comm, sum_weights)


def combine_inputs(x, topk_weights, bias) -> tuple:
    biases = (bias,) if isinstance(bias, torch.Tensor) else (() if bias is None else tuple(bias))
    return (x, topk_weights, *biases)


class EagerMixin:
    """Plans and the stream order of one ``ElasticBuffer`` (see the module docstring)."""

    def _init_eager(self) -> None:
        self._replays = self.device.type == "cuda" and self._backend.name == "symmetric"
        # synced dispatches replay (a pause at the count read; False: the full path every call)
        self._replay_synced = True
        # cached dispatches and combines share plans between handles of one kind (handle_kind): a
        # training step makes a new handle, so per-handle plans (False) never replay there
        self._share_plans = True
        self._kind_plans: dict = {}
        self._order = streams.StreamOrder()
        self._made_plans = weakref.WeakSet()  # (their handles may outlive the buffer)
        self._fresh_plans: dict = {}

    def _plans_of(self, handle) -> dict:
        """Where the plans of calls with ``handle`` live: the handle's, or the buffer's own (None:
        fresh dispatches, their plans paired with the handle to copy, see :meth:`_new_handle`;
        with ``_share_plans``: every handle's, keyed by :meth:`_scoped`)."""
        if handle is None:
            return self._fresh_plans
        return self._kind_plans if self._share_plans else handle.plans

    def _sharing(self, handle) -> bool:
        return self._share_plans and isinstance(handle, EPHandle) and handle.buffer_id == self._id

    def _scoped(self, handle, key):
        """``key`` as the plans of ``handle``'s calls are keyed (with its kind when shared)."""
        if key is None or not self._sharing(handle):
            return key
        return key, handle_kind(handle)

    def _plan_inputs(self, handle, inputs: tuple, replay: bool = False) -> tuple:
        """A call's inputs, with the handle's tensors where plans are shared between handles (for a
        ``replay``, views not made yet stay :class:`tritonep.replay.LazyView`: it reads addresses)."""
        if not self._sharing(handle):
            return inputs
        if replay and type(handle) is ReplayedHandle:
            lazy = handle.__dict__["_lazy"]
            return (*inputs, *(lazy[name] for name in HANDLE_TENSORS))
        return (*inputs, *(getattr(handle, name) for name in HANDLE_TENSORS))

    def _rows(self, handle):
        """The rows that size a cached dispatch's outputs in a shared plan (None: fixed by the key)."""
        return handle.num_recv_tokens if self._sharing(handle) and not handle.do_expand else None

    def _may_replay(self, handle, key) -> bool:
        """Whether calls of ``key`` with ``handle`` (None: a fresh dispatch) may be recorded and replayed."""
        if key is None or not self._replays or self._destroyed:
            return False
        if handle is None:
            return key[_CPU_SYNC] is False or self._replay_synced
        return isinstance(handle, EPHandle) and handle.buffer_id == self._id

    def _plan(self, handle, key):
        """The plan for ``key``, if this buffer is alive and made the handle."""
        if not self._may_replay(handle, key):
            return None
        plan = self._plans_of(handle).get(key)
        return None if type(plan) is int else plan

    def _recorder(self, handle, key):
        """A context that records the backend call when its plan may be kept, else :data:`NO_RECORDING`.
        A plan that later calls replay with other counts (synced, shared) records strictly: a route
        the counts choose taints it (``recording.depends_on_counts``)."""
        if not self._may_replay(handle, key):
            return NO_RECORDING
        plans = self._plans_of(handle)
        if key not in plans and len(plans) >= MAX_PLANS:
            return NO_RECORDING
        seen = plans.get(key, 0)  # (calls of this kind without a plan: an int until a plan replaces it)
        plans[key] = seen + 1
        if seen == 0 or seen > RECORD_TRIES:
            return NO_RECORDING
        from . import replay

        return replay.record(strict=handle is None or self._sharing(handle))

    def _keep_plan(self, handle, key, rec, inputs: tuple, results: tuple, made=None, rows=None) -> None:
        """Keep the plan recorded by ``rec`` (a no-op for :data:`NO_RECORDING`): ``results``, the
        call's outputs (a dispatch's first four allocations, a combine's two); ``made``: the handle
        a fresh dispatch made (a replay rebuilds its tensors too)."""
        if rec is NO_RECORDING:
            return
        from . import replay

        results = tuple(results[:4])  # (the four outputs of a dispatch; both of a combine)
        if made is not None:
            results = (*results, *(getattr(made, name) for name in HANDLE_TENSORS))
        plan = replay.build(rec, inputs, results, self.device, rows)
        if not isinstance(plan, replay.Plan):  # (counted by _recorder: such a kind stops recording)
            return
        self._made_plans.add(plan)
        if made is None:
            self._plans_of(handle)[key] = plan
            return
        template = EPHandle.__new__(EPHandle)  # the handle's other fields, without its tensors
        template.__dict__.update(made.__dict__, **dict.fromkeys(HANDLE_TENSORS), plans=None)
        template.__dict__.pop("_kind", None)  # (the kind of each new handle: its own rows)
        self._fresh_plans[key] = (plan, template)

    def _new_handle(self, template, tensors, host) -> EPHandle:
        """A fresh dispatch's handle from its replay: ``tensors`` (:data:`HANDLE_TENSORS`) and, for
        a synced dispatch, the counts it read (``host``, see ``handle.host_fields``)."""
        handle = ReplayedHandle.__new__(ReplayedHandle)
        handle.__dict__.update(template.__dict__)
        handle.__dict__["_lazy"] = dict(zip(HANDLE_TENSORS, tensors))
        handle.plans = {}
        if host is None:  # (no CPU sync: no counts)
            handle.num_recv_tokens_per_expert_list = []
        else:
            R, L = self.num_ranks, template.num_experts // self.num_ranks
            handle.num_recv_tokens = handle.raw("recv_src_metadata").shape[0]
            handle.__dict__.update(host_fields((host[:R], host[R:R + L]), R, template.num_max_tokens_per_rank,
                                               handle.raw("topk_idx").shape[1], L, template.expert_alignment))
        return handle

    def _drop_plans(self) -> None:
        """At destroy: the plans let go of the buffer's memory (a handle may live on; its plans are
        never run again: :meth:`_plan` checks that the buffer is alive)."""
        for plan in list(self._made_plans):
            plan.steps, plan.offsets, plan.keep = [], [], []
        self._fresh_plans.clear()
        self._kind_plans.clear()

    def _enter(self, compute, previous_event, on_comm: bool):
        """The stream entry of a full call (``compute``: the caller's stream, None on CPU ranks):
        the comm stream made current for a call ``on_comm``, else the caller's stream stays.
        Returns what :func:`streams.leave` and :meth:`_finish` take."""
        if compute is None:
            return None
        if on_comm:
            return streams.enter(self.device, previous_event, compute, self._order)
        self._order.on(compute)
        return None

    def _finish(self, compute, async_op: bool, inputs, outputs) -> EventOverlap:
        """The stream epilogue of a call (``compute``: what :meth:`_enter` returned)."""
        if compute is None:
            if self.device.type == "cuda":  # (it stayed on the caller's stream: nothing to record)
                return EventOverlap(None)
            return streams.finish(self.device, async_op, inputs, outputs, None)
        event = streams.finish(self.device, async_op, inputs=inputs, outputs=outputs, compute=compute)
        self._order.set(streams.comm_stream(self.device) if async_op else compute)
        return event

    def _replay(self, plan, inputs: tuple, async_op: bool, on_comm: bool, rows=None, lazy_from=None):
        """Run ``plan`` with the stream protocol of the full call: ``(outputs, EventOverlap, host
        values read or None)``, or None when the full path must run (the caller is on the comm
        stream, or a plan that reads on the host inside a CUDA graph capture: it raises there).
        ``lazy_from``: see :meth:`tritonep.replay.Plan.run`."""
        raw = _raw_stream(self.device.index)
        comm = streams.comm_stream(self.device)
        if raw == comm.cuda_stream or (plan.pause is not None and torch.cuda.is_current_stream_capturing()):
            return None
        try:
            if not on_comm:
                if raw != self._order.raw:
                    self._order.switch(torch.cuda.current_stream(self.device), raw)
                outs, host = plan.run(inputs, raw, rows, lazy_from)
                return outs, EventOverlap(None), host
            compute = self._enter(torch.cuda.current_stream(self.device), None, True)
            try:
                outs, host = plan.run(inputs, comm.cuda_stream, rows, lazy_from)
            finally:
                streams.leave(compute)
        except Stale:  # (nothing was launched)
            return None
        # (the stream records go to the allocations that lazy views and lazy inputs stand for)
        inputs, recorded = ([t.base if type(t) is LazyView else t for t in ts] for ts in (inputs, outs))
        return outs, self._finish(compute, async_op, inputs, recorded), host


__all__ = ["EagerMixin", "ReplayedHandle", "dispatch_key", "combine_key", "describe_key", "combine_inputs", "NO_RECORDING"]
