"""Expert parallelism across hosts: hybrid mode against direct mode on the same routing.

Run: torchrun --nproc_per_node=4 benchmarks/bench_hosts.py --per-host 2 [--tokens 1024 4096] [--out rows.json]

``--per-host U`` declares hosts of ``U`` ranks (``TRITONEP_SCALEUP_SIZE``): on one machine the
ranks of different declared hosts never map each other's memory, so the rows between them travel
through ``torch.distributed`` (NCCL) as they would between machines; on a real cluster leave it
out. ``--shared-gpu``: every rank on GPU 0 over gloo (a check that it runs, no meaningful time).
Backends on the same routing (DeepSeek-V3: top-8 of 256 experts, uniform):

* ``hybrid`` (``allow_hybrid_mode=True``): each token once to each destination host other than its
  own, then over the host's heap;
* ``direct`` (``allow_hybrid_mode=False``, the ``alltoall`` backend): once to each destination rank
  on another host.

Network bytes per rank (counted from the routing, rank 0): dispatch = rows crossing hosts x row
bytes (FP8: ``H + 4 * H / 128``; BF16: ``2 * H``); combine = the same rows back in BF16 (``2 * H``:
hybrid sends one partial per (token, host), direct one per (token, rank)). Times: median of
``--iters`` calls (CUDA events, a barrier before each) of a fresh dispatch with ``do_cpu_sync``, a
cached dispatch, and a combine.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bench_ep import _time, init_ranks, shape_args, write_rows


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0])
    p.add_argument("--per-host", type=int, default=0, help="ranks per declared host (0: real hosts)")
    p.add_argument("--dispatch-dtype", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--shared-gpu", action="store_true", help="every rank on GPU 0, gloo between them")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="write every row as JSON")
    args = p.parse_args()
    if args.per_host:
        os.environ["TRITONEP_SCALEUP_SIZE"] = str(args.per_host)
    if args.shared_gpu:
        os.environ["TRITONEP_DEVICE"] = "cuda"
        dist.init_process_group("gloo")
        rank, dev = dist.get_rank(), torch.device("cuda", 0)
        torch.cuda.set_device(0)
    else:
        rank, dev = init_ranks()
    from tritonep import ElasticBuffer
    from tritonep.layout import network_rows
    from tritonep.testing.gate import make_inputs

    R, H, E, k = dist.get_world_size(), args.hidden, args.experts, args.topk
    fp8 = args.dispatch_dtype == "fp8"
    cuda = dev.type == "cuda"
    T = max(args.tokens)
    bufs = {name: ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=H, num_topk=k,
                                use_fp8_dispatch=fp8, allow_hybrid_mode=name == "hybrid", explicitly_destroy=True)
            for name in ("hybrid", "direct")}
    U = bufs["hybrid"].num_scaleup_ranks
    if rank == 0:
        print(f"{R} ranks, {R // U} hosts of {U}; top-{k} of {E} experts, hidden {H}, {args.dispatch_dtype} dispatch; "
              f"backends: {', '.join(f'{n}={b.backend}' for n, b in bufs.items())}; device {dev}")
        print(f"{'tokens':>6} {'mode':>7} {'net rows':>8} {'disp MB':>8} {'comb MB':>8} "
              f"{'dispatch us':>11} {'cached us':>9} {'combine us':>10}")
    row_bytes = H + 4 * (H // 128) if fp8 else 2 * H
    rows = []
    for n in args.tokens:
        x, topk, w = (t.to(dev) for t in make_inputs(7, rank, n, H, E, k))
        x_in = x
        if fp8:  # FP8 rows with their scales, as a model's FP8 path hands them over
            from tritonep.reference import quantize_fp8

            x_in = quantize_fp8(x)
        for name, buf in bufs.items():
            net = network_rows(topk, E, R, rank, U, hybrid=name == "hybrid")

            def fresh():
                return buf.dispatch(x_in, topk_idx=topk, topk_weights=w, num_experts=E, num_max_tokens_per_rank=T)

            recv, _, _, handle, _ = fresh()
            y = torch.randn(handle.num_recv_tokens, H, device=dev).to(torch.bfloat16)
            t_fresh = _time(fresh, args.warmup, args.iters, cuda)
            t_cached = _time(lambda: buf.dispatch(x_in, handle=handle), args.warmup, args.iters, cuda)
            t_combine = _time(lambda: buf.combine(y, handle), args.warmup, args.iters, cuda)
            row = dict(tokens=n, mode=name, backend=buf.backend, hosts=R // U, per_host=U, network_rows=net,
                       dispatch_mb=net * row_bytes / 1e6, combine_mb=net * 2 * H / 1e6, dispatch_us=t_fresh,
                       cached_us=t_cached, combine_us=t_combine, device=str(dev))
            rows.append(row)
            if rank == 0:
                print(f"{n:>6} {name:>7} {net:>8} {row['dispatch_mb']:>8.1f} {row['combine_mb']:>8.1f} "
                      f"{t_fresh:>11.0f} {t_cached:>9.0f} {t_combine:>10.0f}")
    if rank == 0 and args.out:
        write_rows(rows, args.out)
    for buf in bufs.values():
        buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
