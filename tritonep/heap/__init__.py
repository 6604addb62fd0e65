"""Symmetric heaps: :class:`~tritonep.heap.cuda.CudaHeap` on GPUs, :class:`~tritonep.heap.ipc.IpcHeap`
when ranks share a GPU (tests on one-GPU machines), :class:`~tritonep.heap.shm.ShmHeap` on CPUs."""
from __future__ import annotations

import torch

from .base import SymmetricHeap


def peers_can_map(group, device: torch.device) -> bool:
    """True when every rank of ``group`` can load/store every other rank's memory."""
    import socket

    import torch.distributed as dist

    me = (socket.gethostname(), device.index if device.type == "cuda" else -1)
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, me, group=group)
    if len({h for h, _ in everyone}) != 1:
        return False
    ok = True
    if device.type == "cuda":
        ok = all(d == device.index or torch.cuda.can_device_access_peer(device.index, d) for _, d in everyone)
    verdicts: list = [None] * len(everyone)
    dist.all_gather_object(verdicts, ok, group=group)
    return all(verdicts)


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


__all__ = ["SymmetricHeap", "create_heap", "peers_can_map"]
