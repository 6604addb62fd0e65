"""Row copies by the GPU's copy engine (0 SMs): rows (:func:`copy_rows`) and dense bytes between raw
addresses, a peer's included (:func:`copy_bytes`).

The dispatch's receive side copies each peer's rows out of its receive region into the dense
output. When the host knows how many rows each peer sent (a synced dispatch, or a cached dispatch
of a synced handle), one copy per peer does the row data on the copy engine instead of SMs: a
plain ``cudaMemcpyAsync`` when the rows lie back to back (the row dispatch's layout,
``sizing.dispatch_area``), else ``cudaMemcpy2DAsync``: both faster than the epilogue's own SM copy
on few SMs (``tools/ce_copy_probe.py``; docs/benchmarks.md, "2026-11-28: CUDA graphs and the
copy-engine copy-out"). torch binds neither call, so the runtime that torch already loaded is
called through ctypes.
Under a CUDA graph capture the copies are captured like any other stream operation.

The combine sends each source's rows back with dense copies straight into that source's buffer
over NVLink (``backends/symmetric/combine.py``, the dense combine), with a 4-byte flag copy after each
chunk of rows.

On CPU ranks (the interpreter's heap is host memory) the same calls are a strided torch copy and a
``memmove``.
"""
from __future__ import annotations

import ctypes

import torch

from .recording import taint

_MEMCPY_DEVICE_TO_DEVICE = 3
_MEMCPY_DEFAULT = 4  # the runtime infers the direction from the addresses (unified addressing)
_lib = None


def cudart():
    """The CUDA runtime library this process already loaded (torch's), with the signatures we call."""
    global _lib
    if _lib is None:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcudart.so" in line})
        if not paths:
            raise RuntimeError("tritonep.copy_engine: libcudart is not loaded in this process (torch loads it with "
                               "CUDA); build the buffer with KernelConfig(copy_engine_min_bytes=-1) to copy rows with SMs instead")
        lib = ctypes.CDLL(paths[0])
        lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.cudaMemcpy2DAsync.restype = ctypes.c_int
        lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cudaMemcpyAsync.restype = ctypes.c_int
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int
        lib.cudaHostGetDevicePointer.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_uint]
        lib.cudaHostGetDevicePointer.restype = ctypes.c_int
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def copy_rows(dst: torch.Tensor, src: torch.Tensor, src_offset: int, src_pitch: int, rows: int, row_bytes: int,
              stream: int = 0) -> None:
    """Copy ``rows`` rows of ``row_bytes`` bytes that start at byte ``src_offset`` of ``src`` (a 1-D
    uint8 tensor) and lie ``src_pitch`` bytes apart into ``dst`` (``[rows, row_bytes]`` uint8,
    contiguous), on ``stream`` (a ``cudaStream_t`` as an int; GPUs only)."""
    if rows <= 0:
        return
    taint("copy-engine copy")
    if dst.device.type != "cuda":
        dst.copy_(torch.as_strided(src, (rows, row_bytes), (src_pitch, 1), src.storage_offset() + src_offset))
        return
    if src_pitch == row_bytes:  # one dense block: a plain copy (~2x the rate of a strided one)
        copy_bytes(dst.data_ptr(), src.data_ptr() + src_offset, rows * row_bytes, stream)
        return
    lib = cudart()
    rc = lib.cudaMemcpy2DAsync(dst.data_ptr(), row_bytes, src.data_ptr() + src_offset, src_pitch, row_bytes, rows,
                               _MEMCPY_DEVICE_TO_DEVICE, stream)
    if rc:
        raise RuntimeError(f"cudaMemcpy2DAsync of {rows} rows x {row_bytes} B failed: "
                           f"{lib.cudaGetErrorString(rc).decode()} (error {rc})")


def copy_bytes(dst_addr: int, src_addr: int, nbytes: int, stream: int | None) -> None:
    """Copy ``nbytes`` from address ``src_addr`` to ``dst_addr`` (either may be a peer's memory as
    mapped in this process): ``cudaMemcpyAsync`` on ``stream`` (a ``cudaStream_t`` as an int), or
    with ``stream=None`` a host ``memmove`` (CPU ranks: the heap is host memory)."""
    if nbytes <= 0:
        return
    taint("copy-engine copy")
    if stream is None:
        ctypes.memmove(dst_addr, src_addr, nbytes)
        return
    lib = cudart()
    rc = lib.cudaMemcpyAsync(dst_addr, src_addr, nbytes, _MEMCPY_DEFAULT, stream)
    if rc:
        raise RuntimeError(f"cudaMemcpyAsync of {nbytes} B failed: {lib.cudaGetErrorString(rc).decode()} "
                           f"(error {rc})")


def register_host(addr: int, nbytes: int) -> int:
    """Page-lock host memory at ``addr`` (e.g. a shared-memory mapping) for the GPU; returns the
    address the GPU reads it at."""
    lib = cudart()
    rc = lib.cudaHostRegister(addr, nbytes, 1 | 2)  # cudaHostRegisterPortable | cudaHostRegisterMapped
    if rc:
        raise RuntimeError(f"cudaHostRegister of {nbytes} B failed: {lib.cudaGetErrorString(rc).decode()}")
    dev = ctypes.c_void_p()
    rc = lib.cudaHostGetDevicePointer(ctypes.byref(dev), addr, 0)
    if rc:
        raise RuntimeError(f"cudaHostGetDevicePointer failed: {lib.cudaGetErrorString(rc).decode()}")
    return dev.value


def unregister_host(addr: int) -> None:
    cudart().cudaHostUnregister(addr)


__all__ = ["copy_rows", "copy_bytes", "register_host", "unregister_host"]
