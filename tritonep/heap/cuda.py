"""GPU symmetric heap over ``torch.distributed._symmetric_memory`` (CUDA IPC over NVLink)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .base import signal_area_bytes


class CudaHeap:
    """See :class:`tritonep.heap.base.SymmetricHeap`."""

    def __init__(self, group, num_bytes: int, num_signal_words: int):
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        sig_bytes = signal_area_bytes(num_signal_words)
        self._buf, ptrs = self._allocate(group, sig_bytes + num_bytes)
        self.signals = self._buf[:sig_bytes].view(torch.int32)[:num_signal_words]
        self.data = self._buf[sig_bytes:]
        self.signals.zero_()
        self.signal_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=self.device)
        self.data_ptrs = self.signal_ptrs + sig_bytes
        self.signal_addrs = ptrs
        self.data_addrs = [p + sig_bytes for p in ptrs]
        torch.cuda.synchronize()
        dist.barrier(group=group)  # every rank's signal words are zero before anyone signals

    def _allocate(self, group, num_bytes: int) -> tuple[torch.Tensor, list]:
        """``(this rank's uint8 tensor, every rank's base address as mapped here)``; collective."""
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(num_bytes, dtype=torch.uint8, device=self.device)
        self._handle = symm_mem.rendezvous(buf, group)
        return buf, [int(p) for p in self._handle.buffer_ptrs]

    def destroy(self) -> None:
        self.data = self.signals = None
        self._handle = None
        self._buf = None
