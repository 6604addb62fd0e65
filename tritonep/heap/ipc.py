"""GPU symmetric heap for ranks that share a device: CUDA IPC handles, exchanged over the group.

``torch.distributed._symmetric_memory`` refuses two ranks on one device, and NCCL refuses a group
with two ranks on one GPU, so this heap is what lets several processes on ONE GPU (a gloo group,
``TRITONEP_DEVICE=cuda``) run the real GPU kernels against each other: a correctness check for
machines with a single GPU. Kernels of different processes time-slice on the device (no MPS),
so every wait on a peer costs a scheduler time slice (milliseconds): slow, never for timing.

Each rank allocates its bytes with the caching allocator's ordinary ``torch.empty`` and shares
them with ``torch.multiprocessing``'s CUDA tensor reduction (``cudaIpcGetMemHandle``); every peer
opens them (``cudaIpcOpenMemHandle``). A rank keeps its own tensor alive until ``destroy()``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .base import signal_area_bytes


class IpcHeap:
    """See :class:`tritonep.heap.base.SymmetricHeap`."""

    def __init__(self, group, num_bytes: int, num_signal_words: int):
        from torch.multiprocessing.reductions import reduce_tensor

        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        sig_bytes = signal_area_bytes(num_signal_words)
        self._buf = torch.empty(sig_bytes + num_bytes, dtype=torch.uint8, device=self.device)
        self.signals = self._buf[:sig_bytes].view(torch.int32)[:num_signal_words]
        self.data = self._buf[sig_bytes:]
        self.signals.zero_()
        torch.cuda.synchronize()
        handles: list = [None] * self.world_size
        dist.all_gather_object(handles, reduce_tensor(self._buf), group=group)
        self._peers = [self._buf if r == self.rank else rebuild(*args) for r, (rebuild, args) in enumerate(handles)]
        ptrs = [p.data_ptr() for p in self._peers]
        self.signal_ptrs = torch.tensor(ptrs, dtype=torch.int64, device=self.device)
        self.data_ptrs = self.signal_ptrs + sig_bytes
        self.signal_addrs = ptrs
        self.data_addrs = [p + sig_bytes for p in ptrs]
        torch.cuda.synchronize()
        dist.barrier(group=group)  # every rank has mapped every peer before anyone signals

    def destroy(self) -> None:
        self.data = self.signals = None
        self._peers = None
        self._buf = None
