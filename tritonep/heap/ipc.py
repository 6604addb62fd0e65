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

from .cuda import CudaHeap


class IpcHeap(CudaHeap):
    """See :class:`tritonep.heap.base.SymmetricHeap`; :class:`CudaHeap` but for the allocation."""

    def _allocate(self, group, num_bytes: int) -> tuple[torch.Tensor, list]:
        from torch.multiprocessing.reductions import reduce_tensor

        buf = torch.empty(num_bytes, dtype=torch.uint8, device=self.device)
        torch.cuda.synchronize()
        handles: list = [None] * self.world_size
        dist.all_gather_object(handles, reduce_tensor(buf), group=group)
        self._peers = [buf if r == self.rank else rebuild(*args) for r, (rebuild, args) in enumerate(handles)]
        return buf, [p.data_ptr() for p in self._peers]

    def destroy(self) -> None:
        super().destroy()
        self._peers = None
