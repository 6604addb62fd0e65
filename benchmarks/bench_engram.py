"""Engram fetch: rows per second gathered from host memory, against a GPU-resident table.

Run: torchrun --nproc_per_node=N benchmarks/bench_engram.py [--entries-per-token 1 8 32] [--out rows.json]
     python benchmarks/bench_engram.py [...]   (one process: the whole table is this rank's)

Per entries-per-token count: ``engram_fetch(indices)()`` of ``--tokens`` tokens with uniformly random
global ids, queued ``--iters`` times back to back, CUDA events around; the mean per fetch, rows per
second and GB/s of row bytes. The ceiling in the same run: ``index_select`` of the same rows from
the same table held in GPU memory. Hidden 7168 BF16 by default (14 KB rows).
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from bench_ep import finish, init_ranks, single_process_defaults, time_warm


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=65536, help="table rows per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--entries-per-token", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    single_process_defaults(29565)
    rank, dev = init_ranks()
    if dev.type != "cuda":
        raise SystemExit("needs one GPU per rank")
    from tritonep import ElasticBuffer

    R, N, H = dist.get_world_size(), args.entries, args.hidden
    most = args.tokens * max(args.entries_per_token)
    gpu, cpu = ElasticBuffer.get_engram_storage_size_hint(N, H, most)
    buf = ElasticBuffer(dist.group.WORLD, num_bytes=gpu + cpu, num_cpu_bytes=cpu, explicitly_destroy=True)
    table = torch.randn((N, H), device=dev).to(torch.bfloat16)
    buf.engram_write(table)
    full = torch.cat([torch.empty_like(table) for _ in range(R)]) if R > 1 else table  # the ceiling's table
    name = torch.cuda.get_device_name(dev)
    rows = []
    for e in args.entries_per_token:
        idx = torch.randint(0, R * N, (args.tokens, e), device=dev, dtype=torch.int32)
        flat = idx.flatten().long()
        t_fetch = time_warm(lambda: buf.engram_fetch(idx)(), args.iters)
        t_gpu = time_warm(lambda: full.index_select(0, flat), args.iters)
        n = args.tokens * e
        rows.append(dict(entries_per_token=e, rows=n, ranks=R, device=name, fetch_us=t_fetch, index_select_us=t_gpu,
                         row_bytes=2 * H))
    if rank == 0:
        print(f"{R} rank(s), {name}; table {N} x {H} bf16 per rank in host memory, {args.tokens} tokens, "
              f"mean of {args.iters} fetches")
        print(f"{'e/tok':>6} {'rows':>7} {'fetch us':>9} {'Mrows/s':>8} {'GB/s':>6} {'GPU table us':>13} {'GB/s':>6}")
        for r in rows:
            gb = r["rows"] * r["row_bytes"] / 1e3
            print(f"{r['entries_per_token']:>6} {r['rows']:>7} {r['fetch_us']:>9.0f} {r['rows'] / r['fetch_us']:>8.2f} "
                  f"{gb / r['fetch_us']:>6.1f} {r['index_select_us']:>13.0f} {gb / r['index_select_us']:>6.1f}")
    finish(rank, rows, args.out, buf)


if __name__ == "__main__":
    main()
