"""GPU symmetric heap for ranks that share a device: CUDA IPC handles, exchanged over the group.

``torch.distributed._symmetric_memory`` refuses two ranks on one device, and NCCL refuses a group
with two ranks on one GPU, so this heap is what lets several processes on ONE GPU (a gloo group,
``TRITONEP_DEVICE=cuda``) run the real GPU kernels against each other: a correctness check for
machines with a single GPU. Kernels of different processes time-slice on the device (no MPS),
so every wait on a peer costs a scheduler time slice (milliseconds): slow, never for timing.

Each rank allocates its bytes with ``cudaMalloc`` (outside torch's caching allocator), exports them
with ``cudaIpcGetMemHandle`` and opens every peer's (``cudaIpcOpenMemHandle``); ``destroy()``
closes the peers' and frees its own. Not torch's CUDA IPC: torch keeps an exported block allocated
until every process that opened it says it let go, which a killed process never does.
"""
from __future__ import annotations

import ctypes
import weakref

import torch
import torch.distributed as dist

from ..copy_engine import cudart
from .cuda import CudaHeap

_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_live = [0]  # bytes this process holds in cudaMalloc'd heaps


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]  # cudaIpcMemHandle_t


class _DeviceBytes:
    """``ptr``'s ``num_bytes`` as a CUDA array, for ``torch.as_tensor`` (no copy)."""

    def __init__(self, ptr: int, num_bytes: int):
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (ptr, False),
                                         "strides": None, "version": 3}


def _runtime():
    lib = cudart()
    if not getattr(lib, "_tritonep_ipc", False):
        vp = ctypes.c_void_p
        for name, args in (("cudaMalloc", [ctypes.POINTER(vp), ctypes.c_size_t]), ("cudaFree", [vp]),
                           ("cudaIpcGetMemHandle", [ctypes.POINTER(_IpcHandle), vp]),
                           ("cudaIpcOpenMemHandle", [ctypes.POINTER(vp), _IpcHandle, ctypes.c_uint]),
                           ("cudaIpcCloseMemHandle", [vp]), ("cudaDeviceSynchronize", [])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib._tritonep_ipc = True
    return lib


def _check(lib, rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"tritonep: {what} failed: {lib.cudaGetErrorString(rc).decode()} ({rc})")


def _release(own: int, opened: list, num_bytes: int) -> None:
    """Close the peers' mappings and free this rank's bytes (once: ``destroy()`` or the garbage
    collector; return codes not checked, the process may be exiting)."""
    _live[0] -= num_bytes
    lib = _runtime()
    lib.cudaDeviceSynchronize()  # (no kernel may still use them)
    for p in opened:
        lib.cudaIpcCloseMemHandle(p)
    lib.cudaFree(own)


def live_bytes() -> int:
    """Bytes of IPC heaps this process has allocated and not yet freed."""
    return _live[0]


class IpcHeap(CudaHeap):
    """See :class:`tritonep.heap.base.SymmetricHeap`; :class:`CudaHeap` but for the allocation."""

    def _allocate(self, group, num_bytes: int) -> tuple[torch.Tensor, list]:
        lib = _runtime()
        own = ctypes.c_void_p()
        _check(lib, lib.cudaMalloc(ctypes.byref(own), num_bytes), f"cudaMalloc of {num_bytes} bytes")
        _live[0] += num_bytes
        opened: list = []
        self._release = weakref.finalize(self, _release, own.value, opened, num_bytes)
        handle = _IpcHandle()
        _check(lib, lib.cudaIpcGetMemHandle(ctypes.byref(handle), own), "cudaIpcGetMemHandle")
        handles: list = [None] * self.world_size
        dist.all_gather_object(handles, bytes(handle), group=group)
        ptrs = []
        for r, h in enumerate(handles):
            if r == self.rank:
                ptrs.append(own.value)
                continue
            p = ctypes.c_void_p()
            _check(lib, lib.cudaIpcOpenMemHandle(ctypes.byref(p), _IpcHandle.from_buffer_copy(h),
                                                 _LAZY_ENABLE_PEER_ACCESS), f"cudaIpcOpenMemHandle of rank {r}'s heap")
            opened.append(p.value)
            ptrs.append(p.value)
        return torch.as_tensor(_DeviceBytes(own.value, num_bytes), device=self.device), ptrs

    def destroy(self) -> None:
        super().destroy()
        self._release()
