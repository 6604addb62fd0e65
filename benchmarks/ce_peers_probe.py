"""How fast the copy engine sends to every peer at once, in the patterns the copy-engine combine uses.

Why: at 2 ranks the combine's copies moved ~358 GB/s; at 4 ranks (three peers, one side stream each)
the whole combine took 1781 us in CUDA graphs against 1144 us with SMs sending (docs/benchmarks.md,
"Dense receive rows, reduction first, four ranks"), i.e. ~180 GB/s. This probe separates the copies
from the reduction: every rank sends ``--mb-per-peer`` MB to each peer's symmetric buffer, all ranks
at once, no kernel running, in these patterns (one row each, GB/s = bytes sent by one rank / time):

* ``streams, 1 copy``: one stream per peer, one copy each (the benchmark's ceiling pattern);
* ``streams, N chunks + flags``: one stream per peer, ``--chunks`` copies each, a 4-byte copy after
  each (the combine's pattern);
* ``streams, N chunks``: the same without the flag copies;
* ``one stream, N chunks + flags``: every peer's chunks on one stream, chunk-major (chunk 0 to every
  peer, then chunk 1, ...).

Times: CUDA events, median of ``--iters`` after warm-up, a barrier before each (bench_ep._time).
Run: torchrun --nproc_per_node=4 benchmarks/ce_peers_probe.py [--mb-per-peer 105] [--chunks 8]
(CPU ranks run it too, with host memmoves: a smoke test of the script, not a measurement.)
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from bench_ep import _time, init_ranks
from tritonep import copy_engine
from tritonep.heap import create_heap


def patterns(heap, rank: int, R: int, nbytes: int, chunks: int, cuda: bool) -> dict:
    """Name -> a function that runs one pattern (module docstring) once."""
    peers = [p for p in range(R) if p != rank]
    src = torch.empty(nbytes + 4, dtype=torch.uint8, device=heap.device)
    flag = src[nbytes:].view(torch.int32)
    flag.fill_(-1)
    streams = [torch.cuda.Stream() for _ in peers] if cuda else [None] * len(peers)

    def run(per_peer_streams: bool, n: int, flags: bool) -> None:
        main = torch.cuda.current_stream() if cuda else None
        used = streams if per_peer_streams else streams[:1]
        for st in used:
            if cuda:
                st.wait_stream(main)
        size = -(-nbytes // n)
        for c in range(n):  # chunk-major: every peer's first chunk first
            for i, p in enumerate(peers):
                st = used[i if per_peer_streams else 0]
                handle = st.cuda_stream if cuda else None
                lo = c * size
                copy_engine.copy_bytes(heap.data_addrs[p] + rank * nbytes + lo, src.data_ptr() + lo,
                                       min(size, nbytes - lo), handle)
                if flags:  # the flag words sit in the peer's signal area (word 0 of this rank's row)
                    copy_engine.copy_bytes(heap.signal_addrs[p] + 4 * rank, flag.data_ptr(), 4, handle)
        for st in used:
            if cuda:
                main.wait_stream(st)

    return {"streams, 1 copy": lambda: run(True, 1, False),
            f"streams, {chunks} chunks + flags": lambda: run(True, chunks, True),
            f"streams, {chunks} chunks": lambda: run(True, chunks, False),
            f"one stream, {chunks} chunks + flags": lambda: run(False, chunks, True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb-per-peer", type=float, default=105.0)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    rank, device = init_ranks()
    cuda = device.type == "cuda"
    R = dist.get_world_size()
    nbytes = int(args.mb_per_peer * 1e6) // 16 * 16
    heap = create_heap(dist.group.WORLD, R * nbytes, R, device)
    rows = []
    for name, fn in patterns(heap, rank, R, nbytes, args.chunks, cuda).items():
        t = _time(fn, args.warmup, args.iters, cuda)
        rows.append((name, t, (R - 1) * nbytes / t / 1e3))
    if rank == 0:
        print(f"{R} ranks, {nbytes / 1e6:.1f} MB to each of {R - 1} peers, every rank at once")
        print(f"{'pattern':<34} {'us':>8} {'GB/s per rank':>14}")
        for name, t, gbs in rows:
            print(f"{name:<34} {t:>8.0f} {gbs:>14.1f}")
    dist.barrier()
    heap.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
