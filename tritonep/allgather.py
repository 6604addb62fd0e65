"""All-gather sessions (DeepEP V2's AGRS, spec section 7) and reduce-scatter in the same sessions,
with the data moved by the copy engine and the flags by stream memory operations
(:mod:`tritonep.stream_ops`; on CPU ranks the same steps on the host).

A session hands out regions of the buffer's heap from offset 0 onwards: an all-gather of a tensor
of ``b`` bytes takes ``align(b * R, 32)`` bytes, rank ``q``'s copy at ``q * b``. Each rank copies its
tensor into its slice on every rank (its own skipped when the tensor already lies there: the
in-place tensors of :meth:`AgrsMixin.agrs_get_inplace_tensor`), then writes the session number into
word ``(call, rank)`` of every peer and waits until every peer's word for the call holds it. All of
that is queued on the communication stream after the current stream's work; the returned wait
function makes the current stream wait for it. Destroying the session signals "done" to every peer
and waits for theirs; after that the regions may be overwritten.

``reduce_scatter(t)`` (a tritonep addition): ``t`` is ``[R, *shape]``; rank ``q`` gets
``sum over ranks p of t_p[q]``. Each rank copies ``t[q]`` into slice ``p`` of rank ``q``'s region
(the copy engine), the flags as above, then adds its ``R`` slices in rank order in fp32 and rounds
once to ``t``'s dtype: ``R`` small torch kernels on the communication stream, the only SM work.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from . import sizing, streams
from .stream_ops import PeerFlags

#: the most all-gathers (and reduce-scatters) one session may hold (DeepEP's limit)
MAX_CALLS = 32


def _shapes(shapes) -> tuple[list, bool]:
    """``(list of shapes, batched)``: batched when ``shapes`` is a sequence of shapes."""
    batched = isinstance(shapes, (list, tuple)) and len(shapes) > 0 and isinstance(shapes[0], (tuple, list,
                                                                                               torch.Size))
    return ([tuple(s) for s in shapes] if batched else [tuple(shapes)]), batched


class Sessions(PeerFlags):
    """The AGRS state of one buffer (built by the first ``agrs_set_config``)."""

    def __init__(self, group, heap, device: torch.device, timeout_s: float):
        super().__init__(group, (MAX_CALLS + 1) * dist.get_world_size(group), device, timeout_s)
        self.heap = heap
        self.max_bytes = self.max_calls = 0
        self.session, self.active = 0, False
        self.offset = self.calls = 0


    def reserve(self, nbytes: list, op: str) -> tuple[list, int]:
        """``(offsets, end)`` of the next call's regions (checked against the session's budget)."""
        if not self.max_bytes:
            raise ValueError(f"{op}: call agrs_set_config first")
        if not self.active:
            raise ValueError(f"{op}: no AGRS session is open (create_agrs_session or agrs_new_session)")
        offsets, at = [], self.offset
        for b in nbytes:
            offsets.append(at)
            at += sizing.align(b * self.num_ranks, 32)
        if at > self.max_bytes or self.calls >= self.max_calls:
            raise ValueError(f"{op}: the session holds {self.max_bytes} bytes and {self.max_calls} calls; this "
                             f"call needs up to byte {at}, call {self.calls + 1}. Did you forget to flush the session "
                             "(destroy_agrs_session)?")
        return offsets, at

    def exchange(self, copies: list, call: int) -> None:
        """Queue ``copies`` ``(dst address, src address, bytes)``, then the flags of ``call``."""
        for dst, src, nbytes in copies:
            self.signals.copy(dst, src, nbytes)
        self._all_peers(call, f"all_gather/reduce_scatter #{call} of AGRS session {self.session}")

    def finish(self) -> None:
        self._all_peers(MAX_CALLS, f"destroy_agrs_session {self.session}")

    def _all_peers(self, call: int, what: str) -> None:
        """Write the session number into word ``call`` of every peer, then wait for every peer's."""
        R, r = self.num_ranks, self.rank
        for q in range(R):
            if q != r:
                self.signals.write(self.word(q, call * R + r), self.session)
        for q in range(R):
            if q != r:
                self.signals.wait(self.word(r, call * R + q), self.session, q, what)

    def view(self, offset: int, shape: tuple, dtype: torch.dtype, rows: int = 1) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize * rows
        return self.heap.data[offset:offset + nbytes].view(dtype).view(*((rows,) if rows > 1 else ()), *shape)

class AgrsMixin:
    """``ElasticBuffer``'s AGRS methods (spec section 7) and ``reduce_scatter``."""

    _agrs = None

    @staticmethod
    def get_agrs_num_max_session_bytes(group, shapes, dtype: torch.dtype) -> int:
        """Bytes of one session that all-gathers tensors of ``shapes`` (one shape or a sequence)."""
        R = dist.get_world_size(group)
        return sum(sizing.align(R * math.prod(s) * dtype.itemsize, 32) for s in _shapes(shapes)[0])

    @staticmethod
    def get_agrs_buffer_size_hint(group, session_bytes: int) -> int:
        return sizing.align(session_bytes, sizing.ALIGNMENT)

    def agrs_set_config(self, num_max_session_bytes: int, num_max_all_gathers_per_session: int) -> None:
        """Collective (a barrier): sessions of up to ``num_max_session_bytes`` (rounded up to 32)
        and ``num_max_all_gathers_per_session`` calls (at most 32)."""
        self._check_alive()
        if self.num_ranks < 2:
            raise ValueError("AGRS sessions need at least 2 ranks")
        for name, v in (("num_max_session_bytes", num_max_session_bytes),
                        ("num_max_all_gathers_per_session", num_max_all_gathers_per_session)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"agrs_set_config: {name} must be a positive int, got {v!r}")
        max_bytes = sizing.align(num_max_session_bytes, 32)
        if max_bytes > self.num_bytes:
            raise ValueError(f"agrs_set_config: {max_bytes} session bytes exceed num_bytes ({self.num_bytes}); "
                             "size the buffer with get_agrs_buffer_size_hint")
        if num_max_all_gathers_per_session > MAX_CALLS:
            raise ValueError(f"agrs_set_config: at most {MAX_CALLS} calls per session, got "
                             f"{num_max_all_gathers_per_session}")
        if self._agrs is None:
            heap = getattr(self._backend, "heap", None)
            if heap is None:
                raise NotImplementedError(f"AGRS sessions need every rank in one NVLink domain (the symmetric "
                                          f"backend); this buffer runs {self.backend!r}")
            self._agrs = Sessions(self.group, heap, self.device, self.num_gpu_timeout_secs)
        if self._agrs.active:
            raise ValueError("agrs_set_config: a session is open")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._agrs.max_bytes, self._agrs.max_calls = max_bytes, num_max_all_gathers_per_session

    def create_agrs_session(self) -> None:
        s = self._agrs_state("create_agrs_session")
        if s.active:
            raise ValueError("create_agrs_session: a session is already open")
        s.active, s.offset, s.calls = True, 0, 0
        s.session += 1

    def destroy_agrs_session(self) -> None:
        """Collective: after every rank's current stream reached this point, the session's regions
        are free (its outputs become invalid)."""
        s = self._agrs_state("destroy_agrs_session")
        if not s.active:
            raise ValueError("destroy_agrs_session: no AGRS session is open")
        s.active = False
        with self._agrs_stream() as comm:
            s.finish()
        if comm is not None:
            torch.cuda.current_stream(self.device).wait_stream(comm)

    @contextlib.contextmanager
    def agrs_new_session(self, enabled: bool = True):
        """``with buffer.agrs_new_session(): ...``: create, then destroy on the way out."""
        if not enabled:
            yield
            return
        self.create_agrs_session()
        try:
            yield
        finally:
            self.destroy_agrs_session()

    def agrs_get_inplace_tensor(self, shapes, dtype: torch.dtype):
        """This rank's slice(s) of the region(s) the next ``all_gather`` will use: fill them and pass
        them to it, and no copy of their own is made. One shape: a tensor; a sequence: a tuple."""
        s = self._agrs_state("agrs_get_inplace_tensor")
        shapes, batched = _shapes(shapes)
        nbytes = [math.prod(sh) * dtype.itemsize for sh in shapes]
        offsets, _ = s.reserve(nbytes, "agrs_get_inplace_tensor")
        views = tuple(s.view(o + b * s.rank, sh, dtype) for o, b, sh in zip(offsets, nbytes, shapes))
        return views if batched else views[0]

    def all_gather(self, tensors):
        """All-gather ``tensors`` (one, or a list, each contiguous on this buffer's device) in the open
        session. Returns ``(gathered, wait_fn)`` or ``(*gathered, wait_fn)``: ``gathered`` is a
        ``[R, *t.shape]`` view of the heap (row ``q``: rank ``q``'s tensor), valid after ``wait_fn()``
        (which makes the current stream wait) until the session is destroyed."""
        batched = isinstance(tensors, (list, tuple))
        ts = list(tensors) if batched else [tensors]
        s = self._agrs_state("all_gather")
        offsets, end = self._agrs_check(s, ts, "all_gather")
        R, r = s.num_ranks, s.rank
        base = s.heap.data_addrs
        copies = []
        for t, o in zip(ts, offsets):
            inplace = t.data_ptr() == base[r] + o + t.nbytes * r
            copies += [(base[q] + o + t.nbytes * r, t.data_ptr(), t.nbytes) for q in range(R)
                       if not (inplace and q == r)]
        outs = [s.view(o, tuple(t.shape), t.dtype, R) for t, o in zip(ts, offsets)]
        wait = self._agrs_run(s, end, ts, copies, lambda: None)
        return (*outs, wait) if batched else (outs[0], wait)

    def reduce_scatter(self, t: torch.Tensor):
        """Reduce-scatter ``t`` ``[R, *shape]`` in the open session: returns ``(out, wait_fn)``, ``out``
        ``[*shape]`` in ``t``'s dtype = the sum over ranks ``p`` of ``t_p[this rank]`` (fp32, rank order,
        one rounding), valid after ``wait_fn()``."""
        s = self._agrs_state("reduce_scatter")
        R, r = s.num_ranks, s.rank
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != R:
            raise ValueError(f"reduce_scatter: t must be [{R}, ...] (a slice per rank)")
        if not t.is_contiguous():  # (the copies read its slices at t.data_ptr() + q * chunk)
            raise ValueError("reduce_scatter: t must be contiguous")
        (o,), end = self._agrs_check(s, [t[0]], "reduce_scatter")
        chunk = t.nbytes // R
        copies = [(s.heap.data_addrs[q] + o + chunk * r, t.data_ptr() + chunk * q, chunk) for q in range(R)]
        slices = s.view(o, tuple(t.shape[1:]), t.dtype, R)
        out = torch.empty(t.shape[1:], dtype=t.dtype, device=self.device)

        def reduce():
            acc = slices[0].float()
            for q in range(1, R):
                acc += slices[q].float()
            out.copy_(acc)

        wait = self._agrs_run(s, end, [t, out], copies, reduce)
        return out, wait

    # -- helpers -----------------------------------------------------------------------------
    def _agrs_state(self, op: str) -> Sessions:
        self._check_alive()
        if self._agrs is None or not self._agrs.max_bytes:
            raise ValueError(f"{op}: call agrs_set_config first")
        self._agrs.signals.check()
        return self._agrs

    def _agrs_check(self, s: Sessions, ts: list, op: str) -> tuple[list, int]:
        if not ts:
            raise ValueError(f"{op}: no tensor given")
        for t in ts:
            if not isinstance(t, torch.Tensor) or t.device != self.device or not t.is_contiguous():
                raise ValueError(f"{op}: every tensor must be contiguous on {self.device}")
        offsets, end = s.reserve([t.nbytes for t in ts], op)
        lo, hi = s.heap.data_addrs[s.rank], s.heap.data_addrs[s.rank] + s.max_bytes
        for t, o in zip(ts, offsets):
            want = lo + o + t.nbytes * s.rank
            if lo <= t.data_ptr() < hi and t.data_ptr() != want:
                raise ValueError(f"{op}: an in-place tensor lies at byte {t.data_ptr() - lo} of the session area, "
                                 f"not at {want - lo} where this call puts this rank's slice (take it from "
                                 "agrs_get_inplace_tensor just before the call)")
        return offsets, end

    @contextlib.contextmanager
    def _agrs_stream(self):
        """The communication stream, after the current stream's work (None on CPU ranks)."""
        if self.device.type != "cuda":
            yield None
            return
        comm = self.get_comm_stream()
        comm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(comm):
            yield comm

    def _agrs_run(self, s: Sessions, end: int, keep: list, copies: list, then):
        """Queue the call's copies, flags and ``then()``; advance the session to ``end``; return the
        wait function."""
        call, session = s.calls, s.session
        caller = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        with self._agrs_stream() as comm:
            s.exchange(copies, call)
            then()
            event = streams.capture() if comm is not None else None
            for t in keep if comm is not None else ():
                t.record_stream(comm)  # the caller may free them before the copies ran
        s.offset, s.calls = end, call + 1

        def wait_fn():
            if s.session != session or not s.active:
                raise ValueError("wait_fn: its AGRS session has ended")
            if caller is not None:
                if torch.cuda.current_stream(self.device) != caller:
                    raise ValueError("wait_fn must be called on the stream that was current at the call")
                event.current_stream_wait()
        return wait_fn
