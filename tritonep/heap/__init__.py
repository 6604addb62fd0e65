"""Symmetric heaps: :class:`~tritonep.heap.cuda.CudaHeap` on GPUs, :class:`~tritonep.heap.ipc.IpcHeap`
when ranks share a GPU (tests on one-GPU machines), :class:`~tritonep.heap.shm.ShmHeap` on CPUs."""
from __future__ import annotations

import torch

from .base import SymmetricHeap


def create_heap(group, num_bytes: int, num_signal_words: int, device: torch.device) -> SymmetricHeap:
    """Collective: allocate ``num_bytes`` of data and ``num_signal_words`` int32 signal words on every rank."""
    if device.type == "cuda":
        import torch.distributed as dist

        from .cuda import CudaHeap
        from .ipc import IpcHeap

        devices: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(devices, torch.cuda.current_device(), group=group)
        shared = len(set(devices)) < len(devices)  # torch's symmetric memory refuses that
        return (IpcHeap if shared else CudaHeap)(group, num_bytes, num_signal_words)
    from .shm import ShmHeap

    return ShmHeap(group, num_bytes, num_signal_words)


__all__ = ["SymmetricHeap", "create_heap"]
