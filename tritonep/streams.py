"""The stream and event protocol of dispatch and combine (spec 2.10), and the communication stream.

A call that overlaps (``async_with_compute_stream``) or asks for it (``allocate_on_comm_stream``)
runs on one high-priority communication stream per device (shared by every buffer, as in DeepEP):
:func:`enter` makes it current after the caller's stream (or ``previous_event``), :func:`finish`
records outputs on the caller's stream and either makes the caller's stream wait or returns an event.
Any other call queues its work on the caller's stream itself: the caller's stream would wait for
it anyway, and the two stream waits and the output records that the comm stream needs cost the
host more than the call's kernel launches (docs/benchmarks.md, host cost of eager calls).
:class:`StreamOrder` keeps one buffer's operations in call order across the streams they run on.
On CPU ranks every call completes before it returns, so these are no-ops there.
"""
from __future__ import annotations

import torch

from .handle import CompletedEvent, EventOverlap

#: one high-priority communication stream per device, shared by every ElasticBuffer
_comm_streams: dict = {}


def comm_stream(device: torch.device):
    """The process-wide communication stream of ``device`` (None for the CPU)."""
    if device.type != "cuda":
        return None
    stream = _comm_streams.get(device.index)
    if stream is None:
        stream = _comm_streams[device.index] = torch.cuda.Stream(device=device, priority=-1)
    return stream


def capture() -> EventOverlap:
    """An event recorded now on the current stream, to pass as ``previous_event``."""
    if not torch.cuda.is_available():
        return EventOverlap(CompletedEvent())
    event = torch.cuda.Event()
    event.record()
    return EventOverlap(event)


def cuda_event(event):
    """The ``torch.cuda.Event`` inside an ``EventOverlap``, an event, or None."""
    event = getattr(event, "event", event)
    return event if isinstance(event, torch.cuda.Event) else None


def caller_stream(device: torch.device, can_capture: bool, backend_name: str):
    """The caller's (compute) stream, None on CPU ranks; raises if it is the comm stream, or if a
    CUDA graph is being captured and the backend cannot be. Looked up once per call and passed on:
    each lookup costs the host several microseconds."""
    if device.type != "cuda":
        return None
    compute = torch.cuda.current_stream(device)
    if compute == comm_stream(device):
        raise ValueError("the current stream is tritonep's communication stream; call dispatch/combine "
                         "from a compute stream (as in DeepEP V2)")
    if not can_capture and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"the {backend_name!r} backend reads the counts on the host (NCCL all-to-all sizes), "
                         "which a CUDA graph capture cannot contain; the 'symmetric' backend can be captured")
    return compute


class StreamOrder:
    """The stream that queued one buffer's latest operation. The buffer's operations are numbered
    on the device in call order, so an operation queued on another stream first makes that stream
    wait for this one (not while a CUDA graph is captured: a capture may not wait for work outside
    it; capture after a synchronisation)."""

    def __init__(self):
        self.raw = None  # its raw handle, compared per call (no Stream object built)
        self.stream = None

    def switch(self, stream, raw: int) -> None:
        """``stream`` (raw handle ``raw``) queues the next operation; call only when ``raw != self.raw``."""
        if self.stream is not None and not torch.cuda.is_current_stream_capturing():
            stream.wait_stream(self.stream)
        self.raw, self.stream = raw, stream

    def set(self, stream) -> None:
        """``stream`` is ordered after the latest operation already (it waited for it)."""
        self.raw, self.stream = stream.cuda_stream, stream

    def on(self, stream) -> None:
        """``stream`` queues the next operation."""
        if stream.cuda_stream != self.raw:
            self.switch(stream, stream.cuda_stream)


def enter(device: torch.device, previous_event, compute=None, order: StreamOrder | None = None):
    """Make the comm stream current, after ``previous_event`` (or the work of ``compute``, the
    current stream) and, with ``order``, after the buffer's latest operation. Returns the compute
    stream for :func:`leave`."""
    if device.type != "cuda":
        return None
    if compute is None:
        compute = torch.cuda.current_stream(device)
    comm = comm_stream(device)
    if order is not None and order.raw not in (None, compute.cuda_stream, comm.cuda_stream):
        comm.wait_stream(order.stream)
    event = cuda_event(previous_event)
    if event is not None:
        comm.wait_event(event)
    else:
        comm.wait_stream(compute)
    torch.cuda.set_stream(comm)
    return compute


def leave(compute) -> None:
    if compute is not None:
        torch.cuda.set_stream(compute)


def waiter(previous_event_before_epilogue):
    """A callable that makes the current stream wait for the event (None without one): the backend
    calls it right before it queues an epilogue."""
    event = cuda_event(previous_event_before_epilogue)
    if event is None:
        return None
    return lambda: torch.cuda.current_stream().wait_event(event)


def finish(device: torch.device, async_with_compute_stream: bool, inputs, outputs, compute) -> EventOverlap:
    """Stream epilogue of spec 2.10: outputs are recorded on the compute stream (they were
    allocated on the comm stream); asynchronous calls also record their inputs on the comm stream
    and return its event, synchronous ones make the compute stream wait."""
    if device.type != "cuda":
        return EventOverlap(CompletedEvent() if async_with_compute_stream else None)
    comm = comm_stream(device)
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
