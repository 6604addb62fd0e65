"""Symmetric heaps: :class:`~tritonep.heap.cuda.CudaHeap` on GPUs, :class:`~tritonep.heap.shm.ShmHeap` on CPUs."""
from __future__ import annotations

import torch

from .base import SymmetricHeap


def create_heap(group, num_bytes: int, num_signal_words: int, device: torch.device) -> SymmetricHeap:
    """Collective: allocate ``num_bytes`` of data and ``num_signal_words`` int32 signal words on every rank."""
    if device.type == "cuda":
        from .cuda import CudaHeap

        return CudaHeap(group, num_bytes, num_signal_words)
    from .shm import ShmHeap

    return ShmHeap(group, num_bytes, num_signal_words)


__all__ = ["SymmetricHeap", "create_heap"]
