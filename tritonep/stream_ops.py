"""Zero-SM signalling between ranks: 32-bit flag writes and waits that no kernel runs.

On GPUs the flags are written and awaited by the stream itself (the driver's stream memory
operations ``cuStreamWriteValue32`` / ``cuStreamWaitValue32``, called through ctypes on the
``libcuda`` that torch loaded), and the data moves by the copy engine
(:func:`tritonep.copy_engine.copy_bytes`): no SM is occupied, the model's kernels keep the GPU.
A write carries a memory barrier, so a peer that sees the flag also sees the bytes copied before
it on the same stream. A wait compares cyclically (``(int32)(*word - value) >= 0``), so counters may
wrap.

A stream wait has no timeout of its own, so :class:`Watchdog` gives it one: every wait is followed
by a write into pinned host memory; when a wait has been its stream's oldest pending one for the
timeout and its marker has not landed, a thread writes the awaited value itself (the stream moves
on, its data is garbage) and records a :class:`~tritonep.errors.CommTimeoutError` naming the
peer; the next call that checks raises it.
A hang becomes an error, never a trap that kills the process.

On CPU ranks (the heap is host memory shared between processes) the same calls are a ``memmove``,
a store and a polling loop that raises the error itself.
"""
from __future__ import annotations

import ctypes
import threading
import time

import torch

from .copy_engine import copy_bytes
from .errors import CommTimeoutError
from .recording import taint

_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32_t)(*addr - value) >= 0
_drv = None


def _driver():
    """``libcuda`` with the two stream memory operations' signatures."""
    global _drv
    if _drv is None:
        lib = ctypes.CDLL("libcuda.so.1")
        for name in ("cuStreamWriteValue32", "cuStreamWaitValue32"):
            fn = getattr(lib, name + "_v2", None) or getattr(lib, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            fn.restype = ctypes.c_int
            setattr(lib, "tritonep_" + name, fn)
        _drv = lib
    return _drv


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"tritonep: {what} failed with CUDA driver error {rc}")


def stream_write(stream: int, addr: int, value: int) -> None:
    """Queue ``*addr = value`` (int32) on ``stream``, after a fence: everything queued before it is
    visible to whoever sees the value."""
    taint("stream memory operation")
    _check(_driver().tritonep_cuStreamWriteValue32(stream, addr, value & 0xFFFFFFFF, 0), "cuStreamWriteValue32")


def stream_wait(stream: int, addr: int, value: int) -> None:
    """Make ``stream`` wait until ``(int32)(*addr - value) >= 0``."""
    taint("stream memory operation")
    _check(_driver().tritonep_cuStreamWaitValue32(stream, addr, value & 0xFFFFFFFF, _WAIT_GEQ),
           "cuStreamWaitValue32")


def reached(word: int, value: int) -> bool:
    """``(int32)(word - value) >= 0``: the cyclic comparison of :func:`stream_wait`."""
    d = (word - value) & 0xFFFFFFFF
    return d < 0x80000000


class Watchdog:
    """Timeouts for the stream waits of one rank (see the module docstring).

    After each wait the stream writes 2 into a word of a pinned host ring, so the watching thread
    reads plain host memory (no CUDA call, little of the GIL) to see which waits have ended. A
    wait's clock starts once every earlier watched wait of its stream has ended (the first poll
    after that): a stream that spends longer than the timeout on other work before a wait would be
    misjudged, which the default timeout (100 s) leaves aside. One marker per wait, not two: each
    stream operation costs the host several microseconds."""

    RING = 4096

    def __init__(self, rank: int, device: torch.device, timeout_s: float, poll_s: float = 1e-3):
        self.rank, self.device, self.timeout_s, self.poll_s = rank, device, timeout_s, poll_s
        self._ring = torch.zeros(self.RING, dtype=torch.int32, pin_memory=True)
        self._state = self._ring.numpy()
        self._base = self._ring.data_ptr()
        self._next = 0
        self._pending: dict = {}  # ring slot -> [stream, addr, value, peer, what, clock start], in queue order
        self._lock = threading.Lock()
        self._error: CommTimeoutError | None = None
        self._thread = None
        self._stream = None  # where a rescue writes the awaited value
        self._closed = False

    def wait(self, stream: int, addr: int, value: int, peer: int, what: str) -> None:
        """Queue a wait for ``*addr >= value`` (cyclic) on ``stream`` (a ``cudaStream_t``), watched."""
        slot = self._next
        while slot in self._pending:  # the host ran a whole ring ahead of the GPU: let it catch up
            time.sleep(self.poll_s)
        self._next = (slot + 1) % self.RING
        self._state[slot] = 0
        with self._lock:
            self._pending[slot] = [stream, addr, value, peer, what, None]
        stream_wait(stream, addr, value)
        stream_write(stream, self._base + 4 * slot, 2)
        if self._thread is None:
            self._stream = torch.cuda.Stream(self.device)
            self._thread = threading.Thread(target=self._run, name=f"tritonep-watchdog-{self.rank}", daemon=True)
            self._thread.start()

    def check(self) -> None:
        """Raise the timeout a watched wait ran into, if any (it stays raised: the peers' state is lost)."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._closed = True

    def _run(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._closed:
            time.sleep(self.poll_s)
            with self._lock:
                pending = list(self._pending.items())
            now = time.monotonic()
            done, busy = [], set()  # busy: streams with an earlier wait still pending
            for slot, entry in pending:
                stream, addr, value, peer, what, since = entry
                if self._state[slot] == 2:
                    done.append(slot)
                    continue
                if stream in busy:
                    continue
                busy.add(stream)
                if since is None:
                    entry[5] = now
                elif now - since > self.timeout_s:
                    if self._error is None:
                        self._error = CommTimeoutError(self.rank, peer, what, self.timeout_s,
                                                       "a stream wait; the value was written for it, so the "
                                                       "stream went on with garbage data")
                    stream_write(self._stream.cuda_stream, addr, value)
                    entry[5] = float("inf")  # rescued once; its marker follows
            if done:
                with self._lock:
                    for slot in done:
                        self._pending.pop(slot, None)


class StreamSignals:
    """Copies, flag writes and flag waits on GPUs: the copy engine and the stream memory operations."""

    def __init__(self, rank: int, device: torch.device, timeout_s: float):
        self.device = device
        self.watchdog = Watchdog(rank, device, timeout_s)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        copy_bytes(dst, src, nbytes, torch.cuda.current_stream(self.device).cuda_stream)

    def write(self, addr: int, value: int) -> None:
        stream_write(torch.cuda.current_stream(self.device).cuda_stream, addr, value)

    def wait(self, addr: int, value: int, peer: int, what: str) -> None:
        self.watchdog.wait(torch.cuda.current_stream(self.device).cuda_stream, addr, value, peer, what)

    def check(self) -> None:
        self.watchdog.check()

    @property
    def failed(self) -> bool:
        return self.watchdog._error is not None

    def close(self) -> None:
        self.watchdog.close()


class HostSignals:
    """The same on CPU ranks: ``memmove``, a store, a polling wait that raises on timeout."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s = rank, timeout_s
        self.failed = False  # a wait ran out of time

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        copy_bytes(dst, src, nbytes, None)

    def write(self, addr: int, value: int) -> None:
        ctypes.c_int32.from_address(addr).value = ((value + 2**31) % 2**32) - 2**31

    def wait(self, addr: int, value: int, peer: int, what: str) -> None:
        word = ctypes.c_int32.from_address(addr)
        deadline = time.monotonic() + self.timeout_s
        while not reached(word.value, value):
            if time.monotonic() > deadline:
                self.failed = True
                raise CommTimeoutError(self.rank, peer, what, self.timeout_s)
            time.sleep(20e-6)

    def check(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_signals(rank: int, device: torch.device, timeout_s: float):
    """:class:`StreamSignals` on GPUs, :class:`HostSignals` on CPU ranks."""
    return StreamSignals(rank, device, timeout_s) if device.type == "cuda" else HostSignals(rank, timeout_s)


class PeerFlags:
    """``num_words`` int32 flag words per rank of ``group`` (a small heap of their own) and the
    signals that write and await them: the base of the ``pp_*`` and AGRS states."""

    def __init__(self, group, num_words: int, device: torch.device, timeout_s: float):
        import torch.distributed as dist

        from .heap import create_heap
        from .heap.base import DATA_ALIGN

        self.group, self.device = group, device
        self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self.words = create_heap(group, DATA_ALIGN, num_words, device)
        self.signals = make_signals(self.rank, device, timeout_s)

    def word(self, rank: int, index: int) -> int:
        """The address of flag word ``index`` of ``rank``."""
        return self.words.signal_addrs[rank] + 4 * index

    @property
    def failed(self) -> bool:
        """Whether one of its waits ran out of time."""
        return self.signals.failed

    def destroy(self) -> None:
        self.signals.close()
        self.words.destroy()
