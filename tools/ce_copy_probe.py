"""How fast the copy engine copies strided rows on one GPU, against an SM copy of the same rows.

The dispatch's receive side copies each peer's rows out of the receive slots (rows of ``row``
bytes every ``pitch`` bytes) into the dense output. This probe times that copy three ways, with CUDA
events, median of 20 after warm-up:
* ``memcpy2d``: ``cudaMemcpy2DAsync`` (the copy engine, 0 SMs), called through ctypes;
* ``memcpy``: a dense ``copy_`` of the same bytes (``cudaMemcpyAsync``; the copy engine's best case);
* ``torch strided``: ``copy_`` from the strided view (a torch kernel on every SM).

Run: python tools/ce_copy_probe.py [--rows 8192] [--row 7168] [--pitch 7296]
"""
from __future__ import annotations

import argparse
import ctypes
import statistics

import torch


def cudart():
    """The CUDA runtime library the process already loaded (torch's), for functions torch does not bind."""
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libcudart" in line})
    if not paths:
        raise RuntimeError("libcudart is not loaded in this process")
    lib = ctypes.CDLL(paths[0])
    lib.cudaMemcpy2DAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                                      ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    lib.cudaMemcpy2DAsync.restype = ctypes.c_int
    return lib


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--row", type=int, default=7168)
    p.add_argument("--pitch", type=int, default=7296)
    args = p.parse_args()
    torch.cuda.init()
    lib = cudart()
    src = torch.randint(0, 255, (args.rows * args.pitch,), dtype=torch.uint8, device="cuda")
    dst = torch.empty(args.rows * args.row, dtype=torch.uint8, device="cuda")
    view = src.as_strided((args.rows, args.row), (args.pitch, 1))
    stream = torch.cuda.current_stream().cuda_stream

    def memcpy2d():
        rc = lib.cudaMemcpy2DAsync(dst.data_ptr(), args.row, src.data_ptr(), args.pitch, args.row, args.rows, 3,
                                   stream)
        assert rc == 0, rc

    memcpy2d()
    torch.cuda.synchronize()
    assert torch.equal(dst.view(args.rows, args.row), view), "memcpy2d copied the wrong bytes"
    dense = src[:args.rows * args.row]
    nbytes = args.rows * args.row
    rows = [("memcpy2d (copy engine)", timed(memcpy2d)),
            ("memcpy dense (copy engine)", timed(lambda: dst.copy_(dense))),
            ("torch strided copy_ (SMs)", timed(lambda: dst.view(args.rows, args.row).copy_(view)))]
    print(f"{args.rows} rows of {args.row} B, pitch {args.pitch} B: {nbytes / 1e6:.1f} MB")
    for name, us in rows:
        print(f"  {name:28s} {us:8.1f} us  {nbytes / us / 1e3:7.0f} GB/s (bytes copied / time)")


if __name__ == "__main__":
    main()
