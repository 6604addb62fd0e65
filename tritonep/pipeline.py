"""Pipeline-parallel send/recv between ring neighbours (DeepEP V2's ``pp_*``, spec section 6), with
no SM: the copy engine moves the bytes, stream memory operations carry the flags
(:mod:`tritonep.stream_ops`; on CPU ranks the same steps on the host).

Per directed pair (sender ``s``, receiver ``q``) a FIFO of ``inflight`` slots of ``max_bytes``
in ``q``'s heap, in its channel ``c = 0`` when ``s`` is ``q``'s previous rank, else ``1`` (two ranks:
always 0, as ``prev == next``). Message ``m`` of a pair goes to slot ``m % inflight``:

* send: wait until the receiver has taken message ``m - inflight`` (its credit word at the sender
  reaches ``m - inflight + 1``), copy the tensor into the receiver's slot, then write ``m + 1``
  into the receiver's message word of channel ``c``;
* receive: wait until that word reaches ``m + 1``, copy the slot into the tensor, then write
  ``m + 1`` into the sender's credit word.

The counts live on the host (every step is queued on the current stream in call order), the words
hold them modulo 2^32 and the waits compare cyclically. Sizes are not sent: the receiver passes a
tensor of the sender's byte size. The slots are the first ``2 * inflight * max_bytes`` bytes of
the buffer's heap, which dispatch and combine also use: receive every message before the buffer's
next dispatch or combine (as with DeepEP). The flags have a small heap of their own.

A buffer whose backend has no such heap (neighbours on other hosts, no peer access) sends through
``torch.distributed`` point-to-point instead (:class:`DistPipe`).
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from . import sizing
from .errors import CommTimeoutError
from .stream_ops import PeerFlags

#: signal words per rank: message counts by channel, then credits by channel
_MSG, _CREDIT = 0, 2


class Pipe(PeerFlags):
    """The send/recv state of one buffer (built by the first ``pp_set_config``)."""

    def __init__(self, group, heap, device: torch.device, timeout_s: float):
        super().__init__(group, 4, device, timeout_s)
        self.heap = heap
        self.prev, self.next = (self.rank - 1) % self.num_ranks, (self.rank + 1) % self.num_ranks
        self.sent = {self.prev: 0, self.next: 0}
        self.received = {self.prev: 0, self.next: 0}
        self.max_bytes = self.inflight = 0

    def _channel(self, receiver: int, sender: int) -> int:
        return 0 if sender == (receiver - 1) % self.num_ranks else 1

    def _slot(self, rank: int, channel: int, m: int) -> int:
        return self.heap.data_addrs[rank] + (channel * self.inflight + m % self.inflight) * self.max_bytes

    def send(self, t: torch.Tensor, dst: int) -> None:
        c, m = self._channel(dst, self.rank), self.sent[dst]
        if m >= self.inflight:
            self.signals.wait(self.word(self.rank, _CREDIT + c), m - self.inflight + 1, dst,
                              f"pp_send #{m} (waiting for rank {dst} to take message #{m - self.inflight})")
        self.signals.copy(self._slot(dst, c, m), t.data_ptr(), t.nbytes)
        self.signals.write(self.word(dst, _MSG + c), m + 1)
        self.sent[dst] = m + 1

    def recv(self, t: torch.Tensor, src: int) -> None:
        c, m = self._channel(self.rank, src), self.received[src]
        self.signals.wait(self.word(self.rank, _MSG + c), m + 1, src, f"pp_recv #{m} (message never arrived)")
        self.signals.copy(t.data_ptr(), self._slot(self.rank, c, m), t.nbytes)
        self.signals.write(self.word(src, _CREDIT + c), m + 1)
        self.received[src] = m + 1


class DistPipe:
    """``pp_*`` over ``torch.distributed`` point-to-point, for buffers without a heap that maps both
    neighbours (ring neighbours on other hosts, or ranks without peer access): NCCL on GPUs (its
    kernels take SMs; the current stream waits for each receive, the host does not), gloo on CPU
    ranks. Messages of a pair keep their order; a send waits for the send ``inflight`` before it
    to complete. A gloo receive that times out raises :class:`~tritonep.errors.CommTimeoutError`;
    NCCL's own timeout applies on GPUs."""

    def __init__(self, group, device: torch.device, timeout_s: float):
        self.group, self.device, self.timeout_s = group, device, timeout_s
        self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self.prev, self.next = (self.rank - 1) % self.num_ranks, (self.rank + 1) % self.num_ranks
        self.sending = {self.prev: [], self.next: []}  # this rank's sends not known complete, per peer
        self.max_bytes = self.inflight = 0
        self.failed = False  # a receive ran out of time

    def send(self, t: torch.Tensor, dst: int) -> None:
        works = self.sending[dst]
        while len(works) >= self.inflight:
            works.pop(0).wait()
        works.append(dist.isend(t, group=self.group, group_dst=dst))

    def recv(self, t: torch.Tensor, src: int) -> None:
        work = dist.irecv(t, group=self.group, group_src=src)
        if self.device.type == "cuda":
            work.wait()  # the current stream waits, not the host
            return
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            self.failed = True
            raise CommTimeoutError(self.rank, src, "pp_recv (message never arrived)", self.timeout_s, str(e)[:200])

    def destroy(self) -> None:
        self.sending = {}


class PipelineMixin:
    """``ElasticBuffer``'s ``pp_*`` methods (spec section 6)."""

    _pipe = None

    @staticmethod
    def get_pp_buffer_size_hint(num_max_tensor_bytes: int, num_max_inflight_tensors: int) -> int:
        """``num_bytes`` for :meth:`pp_set_config` (DeepEP's formula: send and receive, both neighbours)."""
        per = sizing.align(num_max_tensor_bytes, 32) * num_max_inflight_tensors * 2 * 2
        return sizing.align(per, sizing.ALIGNMENT)

    def pp_set_config(self, num_max_tensor_bytes: int, num_max_inflight_tensors: int) -> None:
        """Collective (a barrier): messages of up to ``num_max_tensor_bytes`` (rounded up to 32),
        at most ``num_max_inflight_tensors`` sent and not yet received per directed pair. The
        message counts carry on: call it with no message in flight."""
        self._check_alive()
        for name, v in (("num_max_tensor_bytes", num_max_tensor_bytes),
                        ("num_max_inflight_tensors", num_max_inflight_tensors)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"pp_set_config: {name} must be a positive int, got {v!r}")
        max_bytes = sizing.align(num_max_tensor_bytes, 32)
        if max_bytes * num_max_inflight_tensors * 4 > self.num_bytes:
            raise ValueError(f"pp_set_config: {num_max_inflight_tensors} messages of {max_bytes} bytes need "
                             f"{max_bytes * num_max_inflight_tensors * 4} bytes of num_bytes, the buffer has "
                             f"{self.num_bytes} (size it with get_pp_buffer_size_hint)")
        if self._pipe is None:
            heap = getattr(self._backend, "heap", None)
            self._pipe = (Pipe(self.group, heap, self.device, self.num_gpu_timeout_secs) if heap is not None else
                          DistPipe(self.group, self.device, self.num_gpu_timeout_secs))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._pipe.max_bytes, self._pipe.inflight = max_bytes, num_max_inflight_tensors

    def pp_send(self, t: torch.Tensor, dst_rank_idx: int, num_sms: int = 0) -> None:
        """Send ``t`` (contiguous, on this buffer's device, a multiple of 32 bytes) to the previous
        or next rank; queued on the current stream, no host wait. ``num_sms`` is accepted and
        unused: the copy engine moves the bytes."""
        self._pipe_check("pp_send", t, dst_rank_idx, "dst_rank_idx").send(t, dst_rank_idx)

    def pp_recv(self, t: torch.Tensor, src_rank_idx: int, num_sms: int = 0) -> None:
        """Receive the next message from ``src_rank_idx`` (previous or next rank) into ``t``, which
        must have the message's byte size; queued on the current stream."""
        self._pipe_check("pp_recv", t, src_rank_idx, "src_rank_idx").recv(t, src_rank_idx)

    def _pipe_check(self, op: str, t, peer, name: str):
        self._check_alive()
        pipe = self._pipe
        if pipe is None or not pipe.inflight:
            raise ValueError(f"{op}: call pp_set_config first")
        if isinstance(pipe, Pipe):
            pipe.signals.check()
        if not isinstance(t, torch.Tensor) or t.device != self.device:
            raise ValueError(f"{op}: t must be a tensor on {self.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: t must be contiguous")
        if t.nbytes % 32 or t.nbytes > pipe.max_bytes:
            raise ValueError(f"{op}: t has {t.nbytes} bytes; it must be a multiple of 32 and at most "
                             f"{pipe.max_bytes} (pp_set_config)")
        if peer not in (pipe.prev, pipe.next):
            raise ValueError(f"{op}: {name}={peer!r} is not a ring neighbour of rank {pipe.rank} "
                             f"({pipe.prev} or {pipe.next})")
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"{op} cannot be captured in a CUDA graph (its waits are watched from the host)")
        return pipe
