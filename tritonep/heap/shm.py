"""CPU symmetric heap: one POSIX shared-memory segment per rank, mapped by every rank of the group.

Segment names are exchanged over the group (gloo). Each rank unlinks its own name as soon as every
rank has mapped it, so the name is gone from ``/dev/shm`` before any kernel runs: nothing is left
behind after ``destroy()``, after the process exits, or after a crash in any rank. Until then an
exception (here or in a peer, seen as a failed collective) unlinks it, and an ``atexit`` hook covers
an interpreter exit during set-up.
"""
from __future__ import annotations

import atexit
import mmap
import os
import socket
import uuid

import torch
import torch.distributed as dist

from .base import signal_area_bytes

SHM_DIR = "/dev/shm"
NAME_PREFIX = "tritonep_"
_pending_unlink: set[str] = set()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _pending_unlink.discard(path)


@atexit.register
def _unlink_pending() -> None:
    for path in list(_pending_unlink):
        _unlink(path)


class ShmHeap:
    """See :class:`tritonep.heap.base.SymmetricHeap`."""

    def __init__(self, group, num_bytes: int, num_signal_words: int):
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device("cpu")
        self._sig_bytes = signal_area_bytes(num_signal_words)
        total = self._sig_bytes + num_bytes
        self._maps: list[mmap.mmap] = []
        path = os.path.join(SHM_DIR, f"{NAME_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}")
        _pending_unlink.add(path)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, total)
            finally:
                os.close(fd)
            paths: list = [None] * self.world_size
            dist.all_gather_object(paths, (socket.gethostname(), path), group=group)
            hosts = {h for h, _ in paths}
            if len(hosts) != 1:
                raise RuntimeError(f"ShmHeap needs every rank on one host; the group spans {sorted(hosts)}")
            for _, peer_path in paths:
                fd = os.open(peer_path, os.O_RDWR)
                try:
                    self._maps.append(mmap.mmap(fd, total))
                finally:
                    os.close(fd)
            dist.barrier(group=group)  # every rank has mapped every segment
        except BaseException:
            self._close_maps()
            raise
        finally:
            _unlink(path)
        bases = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        mine = bases[self.rank]
        self.signals = mine[: self._sig_bytes].view(torch.int32)[: num_signal_words]
        self.data = mine[self._sig_bytes:]
        self.signal_ptrs = torch.tensor([b.data_ptr() for b in bases], dtype=torch.int64)
        self.data_ptrs = self.signal_ptrs + self._sig_bytes
        self.signal_addrs = [b.data_ptr() for b in bases]
        self.data_addrs = [a + self._sig_bytes for a in self.signal_addrs]
        del bases, mine

    def _close_maps(self) -> None:
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a tensor view is still alive; the mapping goes with it
        self._maps = []

    def destroy(self) -> None:
        self.data = self.signals = None
        self._close_maps()
