"""Scale-up backend: the symmetric heap and the Triton kernels (NVLink on GPUs, /dev/shm on CPUs).

This module holds what every operation shares: the heap, the protocol words, the status words, the
host waits and the copy engine's side streams. Each operation lives in a module of its own
(:mod:`.dispatch`, :mod:`.combine`) that chooses its route in one function.

Every operation (dispatch, combine, barrier) is collective and numbered: ``seq`` goes 1, 2, ...,
wrapping before 2^31. The number lives on the device (``op_seq``: the last operation that ended),
read by every launch and advanced by each operation's last launch, so a CUDA graph that replays
operations numbers each replay anew; the host never knows it. Before writing into a peer's buffer
a rank waits until that peer has raised ``freed = prev_seq`` (it finished reading the previous
operation); after writing it raises ``ready = seq``; the reader waits for ``ready == seq`` from
every peer. A dispatch first exchanges counts (``notified = seq``, see ``kernels/layout.py``). The
flags can only ever hold the previous or the current number, so equality tests are exact and
wrap-safe. docs/design.md has the launches.
"""
from __future__ import annotations

import time

import torch

from ... import sizing
from ...config import KernelConfig
from ...errors import OP_RECV_OVERFLOW, CommTimeoutError, raise_recorded
from ...heap import create_heap
from ...recording import taint
from ...status import ORDERED_LOADS, StatusWords
from ...kernels import INTERPRET, block_size, cdiv
from ...kernels import layout as layout_kernels
from ...kernels import primitives
from ..base import CombineArgs, DispatchArgs, DispatchResult
from . import combine as combine_op
from . import dispatch as dispatch_op

#: rows per combine flag word: the flags are sized for the smallest step that a pipelined or dense
#: combine takes (``KernelConfig.combine_push_tile`` rows, ``combine_dense.FLAG_ROWS``)
FLAG_GRAIN = 8
#: seconds a host wait for the GPU polls without sleeping before it sleeps between polls
HOST_SPIN_S = 1e-3


class SymmetricBackend:
    name = "symmetric"
    #: its calls can be captured in CUDA graphs (no host reads inside cached dispatch and combine)
    can_capture = True
    #: the layout kernel checks the expert ids (the host reads its verdict with the counts)
    checks_routing_on_device = True

    def __init__(self, group, num_bytes: int, device: torch.device, gpu_timeout_s: float, cpu_timeout_s: float,
                 max_tokens: int, config: KernelConfig):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.num_bytes = num_bytes
        self.config = config
        self.gpu_timeout_s = gpu_timeout_s
        self.cpu_timeout_s = cpu_timeout_s
        self.timeout_ns = int(gpu_timeout_s * 1e9)
        # the combine's flags per source rank, one word per FLAG_GRAIN rows, for up to ``max_tokens``
        # tokens per rank (the buffer's num_max_tokens_per_rank; 0: no pipelined or dense combine)
        self.flag_blocks = cdiv(max_tokens, FLAG_GRAIN)
        self.flag_rows = self.flag_blocks * FLAG_GRAIN
        self.heap = create_heap(group, num_bytes, sizing.num_signal_words(self.num_ranks, self.flag_blocks), device)
        (self.ready_word, self.freed_word, self.notified_word, self.counts_word,
         self.flags_word) = sizing.signal_offsets(self.num_ranks)
        self.over_word, self.announced_word = sizing.capacity_offsets(self.num_ranks)
        # the number of the last operation that ended (see the module docstring)
        self.op_seq = torch.zeros(1, dtype=torch.int32, device=device)
        # what the first wait that timed out recorded, on the device and copied to host memory
        self.status_words = StatusWords(device)
        self.status = self.status_words.tensor
        # how long fresh dispatches waited for each peer's counts: ns per peer summed, then the count
        self.wait_ns = torch.zeros(self.num_ranks + 1, dtype=torch.int64, device=device)
        # the last-program detectors' counters, one pair of words per kernel kind (views made once:
        # each slicing costs the host microseconds per call)
        self.counters = counters = torch.zeros(10, dtype=torch.int32, device=device)
        (self.counter_dispatch_push, self.counter_dispatch_epilogue, self.counter_combine_push,
         self.counter_combine_reduce, self.counter_layout) = (counters[i:] for i in range(0, 10, 2))
        # the layout count kernel's accumulators: zero between dispatches (the kernel re-zeroes them);
        # allocated here for the largest expert count, never inside a call that a CUDA graph captures
        self.scratch = torch.zeros(layout_kernels.scratch_size(self.num_ranks, sizing.MAX_LOCAL_EXPERTS),
                                   dtype=torch.int32, device=device)
        # pinned host words the gather kernel writes the counts to (status.CountWords), by size
        self.count_words = {}
        # the event a host wait records where it asks the stream (one per buffer: a new torch event
        # creates and later destroys a CUDA event every call)
        self._wait_event = torch.cuda.Event() if device.type == "cuda" else None
        # what the flag copies of the copy-engine combine write, and its side streams and events
        self.minus_one = torch.full((self.flag_blocks + 4,), -1, dtype=torch.int32, device=device)
        self._side_streams = self._side_events = None

    @property
    def capacity(self) -> int:
        """Bytes one dispatch or combine may use (``sizing.dispatch_bytes`` / ``combine_bytes``)."""
        return self.num_bytes

    # -- protocol ---------------------------------------------------------------------------
    def common(self) -> dict:
        """The launch arguments every kernel of an operation takes."""
        return dict(signal_ptrs=self.heap.signal_ptrs, status=self.status, rank=self.rank,
                    num_ranks=self.num_ranks, seq_ptr=self.op_seq, timeout_ns=self.timeout_ns)

    def words(self) -> dict:
        return dict(ready_word=self.ready_word, freed_word=self.freed_word)

    def wait_stats(self, reset: bool) -> dict:
        """See ``ElasticBuffer.get_wait_stats`` (a host sync)."""
        ns = self.wait_ns.tolist()
        if reset:
            self.wait_ns.zero_()
        count = ns[-1]
        wait_us = [t / count / 1e3 if count else 0.0 for t in ns[:-1]]
        slowest = max(range(self.num_ranks), key=wait_us.__getitem__) if count and any(wait_us) else None
        return {"dispatches": count, "wait_us": wait_us, "slowest_rank": slowest}

    def check_recorded(self) -> None:
        """Raise :class:`CommTimeoutError` if a kernel of this buffer recorded a timeout that reached
        host memory (no sync: a buffer's every call asks)."""
        self.status_words.check(self.rank, self.gpu_timeout_s)

    def check_status(self) -> None:
        """Raise :class:`CommTimeoutError` if any earlier wait of this buffer timed out (host sync)."""
        raise_recorded(self.status.tolist(), self.rank, self.gpu_timeout_s)

    def host_wait(self, what: str, ready=None) -> None:
        """Block until ``ready()`` (a poll of host memory the GPU writes, used where this host's
        loads keep their order: ``status.ORDERED_LOADS``), else until the queued GPU work finishes,
        at most ``cpu_timeout_s``."""
        if self.device.type != "cuda":
            return
        event = None
        if ready is None or not ORDERED_LOADS:
            event = self._wait_event
            event.record()
            ready = event.query
        if ready():
            return
        start = time.monotonic()
        deadline = start + self.cpu_timeout_s
        while not ready():
            now = time.monotonic()
            if now > deadline:
                raise CommTimeoutError(self.rank, -1, what, self.cpu_timeout_s, "host wait for the GPU")
            # spin first: the counts usually arrive within tens of microseconds, and a sleep costs
            # at least the kernel's timer slack per poll
            if now - start > HOST_SPIN_S:
                if event is None:  # (a memory poll: a stream query raises an error the device hit)
                    torch.cuda.current_stream(self.device).query()
                time.sleep(50e-6)

    def release(self) -> None:
        """End the current operation early: ``freed = seq`` to every peer (see ``primitives.release``)."""
        primitives.release(self.heap.signal_ptrs, self.status, self.num_ranks, self.freed_word + self.rank,
                           self.op_seq)

    def enter(self, op) -> None:
        """Wait (on the device) until every peer released the previous operation; ``ready = seq``."""
        primitives.enter(self.heap.signal_ptrs, self.status, self.rank, self.num_ranks, self.op_seq, self.ready_word,
                         self.freed_word, self.timeout_ns, op)

    @staticmethod
    def programs(num_sms: int) -> int:
        return max(1, num_sms)

    @staticmethod
    def block_words(words: int) -> int:
        """Words per step of the per-token kernels. The interpreter pays per operation, not per
        element: whole rows at once there."""
        return min(8192 if INTERPRET else 1024, block_size(words))

    def peers(self) -> list:
        """The other ranks, starting after this one (so that no peer is everyone's first)."""
        return [(self.rank + i) % self.num_ranks for i in range(1, self.num_ranks)]

    # -- copy-engine side streams -----------------------------------------------------------
    def fork(self):
        """One side stream per peer for copy-engine sends, forked from the current stream here.
        Returns ``(current stream, side streams)`` for :meth:`join`."""
        taint("side streams")
        lanes = self.num_ranks - 1
        if self._side_streams is None:
            self._side_streams = [torch.cuda.Stream(device=self.device) for _ in range(lanes)]
            self._side_events = [torch.cuda.Event() for _ in range(lanes + 1)]
        current = torch.cuda.current_stream(self.device)
        self._side_events[lanes].record(current)
        for side in self._side_streams:
            side.wait_event(self._side_events[lanes])
        return current, self._side_streams

    def join(self, fork) -> None:
        if fork is None:
            return
        current, sides = fork
        for event, side in zip(self._side_events, sides):
            event.record(side)
            current.wait_event(event)

    # -- operations -------------------------------------------------------------------------
    def dispatch(self, args: DispatchArgs) -> DispatchResult:
        return dispatch_op.dispatch(self, args)

    def combine(self, args: CombineArgs):
        return combine_op.combine(self, args)

    def barrier(self, sync: bool = True) -> None:
        primitives.barrier(self.heap.signal_ptrs, self.status, self.rank, self.num_ranks, self.op_seq,
                           self.ready_word, self.freed_word, self.timeout_ns)
        if sync:
            self.host_wait("barrier")
            self.check_status()

    def clear_overflow(self) -> None:
        """Collective (every rank, nothing else of this buffer in flight): after a
        ``RecvOverflowError``, put the protocol state back as it was when the buffer was built. Every
        rank recorded the overflow at the same dispatch and its kernels did nothing since, so no word
        is in flight; each rank zeroes its own words between two host barriers. A timeout is not
        cleared (raised again: a peer's state is unknown)."""
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        status = self.status.tolist()
        if status[0] not in (0, OP_RECV_OVERFLOW):
            raise_recorded(status, self.rank, self.gpu_timeout_s)
        dist.barrier(group=self.group)
        for t in (self.heap.signals, self.op_seq, self.counters, self.scratch, self.status[:4], self.status_words.host):
            t.zero_()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)

    def destroy(self) -> None:
        self.heap.destroy()
