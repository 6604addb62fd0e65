"""Where the time of one dispatch/combine goes: a torch.profiler table per op and host-side phases.

Run: torchrun --nproc_per_node=2 benchmarks/profile_ep.py [--tokens 8192] [--num-sms 24] [--trace DIR]
     [--config 'dispatch_push_tile=(16, 512, 8)']

Prints, for rank 0, the GPU kernels of ``--iters`` calls of each op (dispatch, cached dispatch,
combine) sorted by GPU time, and the host wall time of the phases a dispatch runs before its
kernels (input checks, routing layout), each timed alone with a device sync around it.
``--trace DIR`` also writes a Chrome trace per rank (open in chrome://tracing or Perfetto);
``--cprofile N`` prints where the Python of N calls of each op spends its time.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

from bench_ep import init_ranks, shape_args


def _host_us(fn, iters: int, synced: bool = True) -> float:
    """Median host wall time of ``fn``; ``synced``: until the GPU finished it too, else only until
    ``fn`` returned (the host cost of queueing its work)."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if synced:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0], tokens=8192)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--dtype", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--trace", default=None, help="directory for Chrome traces (one per rank)")
    p.add_argument("--config", default="", metavar="NAME=VALUE,...",
                   help="tritonep.KernelConfig fields of the buffer, as tests/gpu's TRITONEP_TEST_CONFIG "
                        "(e.g. 'dispatch_push_tile=(16, 512, 8)')")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also profile the Python of N calls of each op (rank 0 prints the top functions)")
    args = p.parse_args()
    rank, device = init_ranks()
    if device.type != "cuda":
        raise SystemExit("this tool measures GPUs: run it with torchrun on a machine with one GPU per rank")
    from tritonep import KernelConfig, ElasticBuffer
    from tritonep.config import parse_settings
    from tritonep.layout import compute_layout
    from tritonep.testing.gate import make_topk

    R, n, H, E, K = dist.get_world_size(), args.tokens, args.hidden, args.experts, args.topk
    buf = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=n, hidden=H, num_topk=K, backend="symmetric",
                        explicitly_destroy=True, config=KernelConfig(**parse_settings(args.config)))
    topk = make_topk(7, rank, n, E, K).to(device)
    w = torch.rand(n, K, device=device)
    x = torch.randn(n, H, device=device).to(torch.bfloat16)
    if args.dtype == "fp8":
        x = (x.float().clamp(-448, 448).to(torch.float8_e4m3fn), torch.rand(n, H // 128, device=device))
    kw = dict(num_sms=args.num_sms)
    _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, **kw)
    y = torch.randn(handle.num_recv_tokens, H, device=device).to(torch.bfloat16)
    ops = {
        "dispatch": lambda: buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, **kw),
        "cached dispatch": lambda: buf.dispatch(x, handle=handle, **kw),
        "combine": lambda: buf.combine(y, handle, **kw),
    }
    for fn in ops.values():  # warm-up: every kernel variant compiled
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    dist.barrier()
    host = {
        # what a dispatch runs on the host (the symmetric backend checks id values in its layout kernel)
        "input checks (_check_topk)": _host_us(lambda: buf._check_topk(topk, w, n, E, check_values=False),
                                               args.iters),
        "torch routing layout (compute_layout, all-to-all backend)":
            _host_us(lambda: compute_layout(topk, E, R, rank, n), args.iters),
    }
    for name, fn in ops.items():
        dist.barrier()
        host[f"whole {name} (host clock, synced)"] = _host_us(fn, args.iters)
        dist.barrier()
        host[f"{name}: until the call returns"] = _host_us(fn, args.iters, synced=False)
    python_tables = {}
    if args.cprofile:
        import cProfile
        import io
        import pstats

        for name, fn in ops.items():
            dist.barrier()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.cprofile):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            python_tables[name] = text.getvalue()
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, fn in ops.items():
        dist.barrier()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                dist.barrier()
                fn()
            torch.cuda.synchronize()
        tables[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace, f"{name.replace(' ', '_')}_rank{rank}.json"))
    if rank == 0:
        for name, table in tables.items():
            print(f"\n=== {name}: {args.iters} calls, {n} tokens/rank, {args.dtype}, {args.num_sms} SMs, {R} ranks ===")
            print(table)
        for name, table in python_tables.items():
            print(f"\n=== Python of {args.cprofile} {name} calls (cProfile, by own time) ===")
            print("\n".join(line[:150] for line in table.splitlines() if line.strip()))
        print("\nhost wall time, median of", args.iters, "(device synced before and after each):")
        for name, us in host.items():
            print(f"  {name:<45} {us:9.1f} us")
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
