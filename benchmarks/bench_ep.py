"""Dispatch/combine timing on GPUs: whole calls as a user sees them, against same-run peers.

Run: torchrun --nproc_per_node=2 benchmarks/bench_ep.py [--tokens 1024 4096 8192] [--out rows.csv] [--plot bw.png]

Per configuration and op: median of ``--iters`` timed calls (CUDA events around the call, after
``--warmup`` calls, a barrier before each), and the ``[b2b]`` columns: the mean per call of
``--iters`` calls queued back to back, which is how DeepEP's own test times its ops, and the
``[graph]`` columns: tritonep's ops captured in CUDA graphs (fresh dispatch with
``do_cpu_sync=False``, cached dispatch, combine, and the combine of a handle from a dispatch with
``do_cpu_sync=False``), ``--iters`` replays queued back to back: the GPU's time without the host's,
as a serving engine that captures its MoE layers sees it. Bytes counted: token rows that cross NVLink per rank
(rows sent to other ranks x row bytes; FP8 rows = hidden + 4 * hidden / 128 scale bytes; BF16 rows =
2 * hidden). Peers measured in the same run on the same routing:
* ``copy-engine``: ``copy_`` of the same number of bytes into the peers' symmetric buffers (an equal
  share to each peer, one stream per peer), every rank at once (0 SMs): the ceiling;
* ``alltoall``: tritonep's portable backend (sort by destination, count exchange,
  ``torch.distributed.all_to_all_single`` over NCCL, regroup), bit-identical to tritonep;
* ``torch``: the pipeline a user writes without an EP library (Megatron's all-to-all dispatcher in
  plain torch, ``torch_pipeline.py``): no metadata beyond the expert ids, regrouped by local expert.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist


def single_process_defaults(port: int) -> None:
    """Let ``python <benchmark>.py`` run as one rank, without torchrun."""
    for k, v in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(port))):
        os.environ.setdefault(k, v)


def init_ranks() -> tuple[int, torch.device]:
    """Join the torchrun group with NVLink multicast kept off: NCCL on GPUs, gloo on CPU ranks (a
    smoke test, kernels under the Triton interpreter). Returns ``(rank, device)``."""
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and torch.cuda.device_count() > rank:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
        return rank, torch.device("cuda", rank)
    dist.init_process_group("gloo")
    return rank, torch.device("cpu")


def _time(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median microseconds of ``fn``: CUDA events on GPUs, the host clock on CPU ranks; a barrier
    before each timed call so that rank skew is not counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _time_back_to_back(fn, iters: int, cuda: bool, host: list | None = None) -> float:
    """Mean microseconds per call of ``iters`` calls queued one after another with nothing between
    them (one barrier before the first): DeepEP's own test times its ops this way, so the host work
    of a call overlaps the GPU work of the one before, and rank skew is paid once, not per call.
    On GPUs the host's time to queue one call is appended to ``host``."""
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if host is not None:
            host.append((time.perf_counter() - t0) * 1e6 / iters)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e6 / iters


def time_warm(fn, iters: int, host: list | None = None) -> float:
    """One call of ``fn`` to warm up (compile), then :func:`_time_back_to_back` on the GPU; the host's
    time to queue one call is appended to ``host``."""
    fn()
    return _time_back_to_back(fn, iters, True, host)


def finish(rank: int, rows: list, out, buf) -> None:
    """Rank 0 writes ``rows`` to ``out`` (if given); the buffer and the process group end."""
    if rank == 0 and out:
        write_rows(rows, out)
    buf.destroy()
    dist.destroy_process_group()


def _graph_times(buf, x, topk, w, E, handle, y, kw, iters: int) -> tuple:
    """Mean microseconds per replay, back to back, of four graphs: fresh dispatch without a CPU
    sync, cached dispatch, combine, and the combine of a handle from a dispatch without CPU sync
    (worst-case rows; its host knows no counts, which changes how the copy-engine combine sends)."""
    from tritonep.testing.graph_check import capture_graph

    _, _, _, free_handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, do_cpu_sync=False, **kw)
    free_y = torch.randn(free_handle.num_recv_tokens, y.shape[1], device=y.device).to(y.dtype)
    bodies = (lambda: buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, do_cpu_sync=False, **kw),
              lambda: buf.dispatch(x, handle=handle, **kw), lambda: buf.combine(y, handle, **kw),
              lambda: buf.combine(free_y, free_handle, **kw))
    times = []
    for body in bodies:
        graph, _ = capture_graph(body)
        times.append(_time_back_to_back(graph.replay, iters, True))
        del graph
    return tuple(times)


def _copy_engine_time(heap, rank: int, R: int, nbytes: int, args) -> float:
    """The ceiling: ``copy_`` of ``nbytes`` into the peers' symmetric buffers, an equal share to every
    peer at once (one stream each), every rank at once; no SM does the copying."""
    data_offset = int(heap.data_ptrs[0] - heap.signal_ptrs[0])
    share = nbytes // max(R - 1, 1)
    peers = [p for p in range(R) if p != rank]
    dsts = [heap._handle.get_buffer(p, (share,), torch.uint8, data_offset + rank * share) for p in peers]
    src = torch.empty(max(share, 1), dtype=torch.uint8, device="cuda")
    streams = [torch.cuda.Stream() for _ in peers]

    def copy_engine():
        main = torch.cuda.current_stream()
        for st, dst in zip(streams, dsts):
            st.wait_stream(main)
            with torch.cuda.stream(st):
                dst.copy_(src[:share])
        for st in streams:
            main.wait_stream(st)

    return _time(copy_engine, args.warmup, args.iters, True)


def write_rows(rows: list, path: str) -> None:
    """All rows as JSON, or CSV when ``path`` ends in .csv (header = the row keys)."""
    if path.endswith(".csv"):
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def plot_rows(rows: list, path: str) -> None:
    """Two panels: dispatch/combine GB/s against tokens per rank (at the largest SM count measured)
    and against the SM count (at the largest token count), tritonep beside its peers and the
    copy-engine ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_sms) = plt.subplots(1, 2, figsize=(11, 4))
    first = rows[0]  # chart one routing and dispatch dtype: the first measured
    rows = [r for r in rows if r.get("routing") == first.get("routing")
            and r.get("dispatch_dtype") == first.get("dispatch_dtype")]
    ours = [r for r in rows if r["op_peer"] == "tritonep"]
    top_sms = max(r["num_sms"] for r in ours)
    top_tokens = max(r["tokens"] for r in rows)
    for op, style in (("dispatch", "-o"), ("combine", "--o")):
        pts = sorted((r["tokens"], r[f"{op}_gbs"]) for r in ours if r["num_sms"] == top_sms)
        by_tokens.plot(*zip(*pts), style, label=f"tritonep {op} ({top_sms} SMs)")
        for peer_name, label in (("alltoall", "tritonep all-to-all backend"), ("torch", "plain torch + NCCL pipeline")):
            peer_by_tokens: dict = {}  # a peer measured more than once per token count: keep the best
            for r in rows:
                if r["op_peer"] == peer_name:
                    peer_by_tokens[r["tokens"]] = max(peer_by_tokens.get(r["tokens"], 0.0), r[f"{op}_gbs"])
            if peer_by_tokens:
                by_tokens.plot(*zip(*sorted(peer_by_tokens.items())), style, alpha=0.6, label=f"{label} {op}")
        pts = sorted((r["num_sms"], r[f"{op}_gbs"]) for r in ours if r["tokens"] == top_tokens)
        by_sms.plot(*zip(*pts), style, label=f"tritonep {op}")
    # back to back (DeepEP's method) and CUDA-graph replays: cached dispatch and combine, where the
    # rows have them
    for op, key, nbytes, style in (
            ("cached dispatch, back to back", "cached_dispatch_b2b_us", "nvlink_bytes_dispatch", "-.^"),
            ("combine, back to back", "combine_b2b_us", "nvlink_bytes_combine", "-.^"),
            ("cached dispatch, CUDA graph", "graph_cached_dispatch_us", "nvlink_bytes_dispatch", "-s"),
            ("combine, CUDA graph", "graph_combine_us", "nvlink_bytes_combine", "--s")):
        pts = sorted((r["tokens"], r[nbytes] / r[key] / 1e3) for r in ours
                     if r["num_sms"] == top_sms and math.isfinite(r.get(key) or math.nan) and r.get(nbytes))
        if pts:
            by_tokens.plot(*zip(*pts), style, label=f"tritonep {op} ({top_sms} SMs)")
    ceiling = sorted({(r["tokens"], r["copy_engine_gbs"]) for r in rows})
    by_tokens.plot(*zip(*ceiling), ":k", label="copy-engine ceiling (dispatch bytes)")
    top_ceiling = [c for t, c in ceiling if t == top_tokens]
    if top_ceiling:
        by_sms.axhline(top_ceiling[0], color="k", linestyle=":", label="copy-engine ceiling (dispatch bytes)")
    by_tokens.set(xlabel="tokens per rank", ylabel="GB/s crossing NVLink per rank", xscale="log")
    by_sms.set(xlabel=f"SMs (programs per kernel), {top_tokens} tokens per rank", ylabel="GB/s")
    if first.get("routing"):
        fig.suptitle(f"{first['dispatch_dtype']} dispatch, bf16 combine, {first['routing']} routing", fontsize=9)
    for ax in (by_tokens, by_sms):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


#: tritonep configs that ``--variants`` times beside the defaults (``impl`` column): a description and
#: the :class:`tritonep.KernelConfig` fields it sets (the rest keep the group's defaults)
VARIANTS = {
    "sm_copy": ("SMs move every row (the dispatch's copy-out, the combine's send), never the copy engine",
                dict(copy_engine_min_bytes=-1)),
    "sm_combine": ("the combine's rows go by SMs into the dense layout (the default above 2 ranks)",
                   dict(combine_by_copy_engine=False)),
    "ce_combine": ("the combine's rows go by the copy engine (the default at 2 ranks)",
                   dict(combine_by_copy_engine=True)),
    "ce_512": ("the copy-engine combine copies 512 rows at a time", dict(copy_engine_chunk_rows=512)),
    "push16": ("dispatch push steps of 16 tokens x 512 words x 8 warps", dict(dispatch_push_tile=(16, 512, 8))),
    "push64": ("dispatch push steps of 64 tokens x 256 words x 8 warps", dict(dispatch_push_tile=(64, 256, 8))),
    "send_256": ("the dense combine's SM senders in 32 x 256-word steps", dict(combine_dense_send_tile=(32, 256))),
    "rt_16": ("the dense combine reduces 16 tokens x 1024 channels per step, 8 warps",
              dict(combine_dense_reduce_tile=(16, 1024, 8))),
}

BYTES_FORMULA = ("GB/s = bytes of token rows that cross NVLink per rank / time: rows sent to other ranks x "
                 "(FP8: hidden + 4 * hidden / 128 scale bytes; BF16: 2 * hidden) for dispatch, x 2 * hidden for "
                 "combine; rows a rank keeps for itself are the 'local MB' column, not counted")


def shape_args(description: str, tokens: int | None = None) -> argparse.ArgumentParser:
    """A parser with the DeepSeek-V3 shape options every benchmark here takes; ``tokens``: one token
    count (this default) instead of a list, for the probes that time one shape."""
    p = argparse.ArgumentParser(description=description)
    if tokens is None:
        p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    else:
        p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    return p


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0])
    p.add_argument("--num-sms", type=int, nargs="+", default=[8, 16, 24, 32, 0], help="0 = every SM")
    p.add_argument("--dispatch-dtype", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    p.add_argument("--routing", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                   help="also time these tritonep configs: " + "; ".join(f"{k}: {v[0]}" for k, v in VARIANTS.items()))
    p.add_argument("--config", default="", metavar="NAME=VALUE,...",
                   help="also time a buffer with these tritonep.KernelConfig fields (impl 'config'), e.g. "
                        "'dispatch_push_tile=(16, 512, 8),copy_engine_chunk_rows=512'")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph columns")
    p.add_argument("--out", default=None, help="write every row: .json, or .csv")
    p.add_argument("--plot", default=None, help="PNG of bandwidth vs tokens/rank and vs SMs (needs matplotlib)")
    args = p.parse_args()
    rank, device = init_ranks()
    cuda = device.type == "cuda"
    all_sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 2
    from tritonep import KernelConfig, ElasticBuffer
    from tritonep.config import parse_settings
    from tritonep.testing.gate import make_topk

    R, H, E, K = dist.get_world_size(), args.hidden, args.experts, args.topk
    L = E // R
    T = max(args.tokens)
    sym = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=H, num_topk=K, backend="symmetric",
                        explicitly_destroy=True)
    configs = [(name, VARIANTS[name][1]) for name in args.variants]
    if args.config:
        configs.append(("config", parse_settings(args.config)))
    variants = [(name, ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=H, num_topk=K,
                                     backend="symmetric", explicitly_destroy=True, config=KernelConfig(**fields)))
                for name, fields in configs]
    a2a = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=H, num_topk=K, backend="alltoall",
                        explicitly_destroy=True)
    from torch_pipeline import TorchPipeline

    plain = TorchPipeline(dist.group.WORLD)
    rows = []
    for n in args.tokens:
        for routing in args.routing:
            topk = make_topk(7, rank, n, E, K, routing).to(device)
            w = torch.rand(n, K, device=device)
            per_dst = [int(((topk // L) == d).any(dim=1).sum()) for d in range(R)]
            rows_out, rows_local = sum(per_dst) - per_dst[rank], per_dst[rank]
            for dtype in args.dispatch_dtype:
                x = torch.randn(n, H, device=device).to(torch.bfloat16)
                if dtype == "fp8":
                    x = (x.float().clamp(-448, 448).to(torch.float8_e4m3fn), torch.rand(n, H // 128, device=device))
                row_bytes = H + 4 * (H // 128) if dtype == "fp8" else 2 * H
                d_bytes, c_bytes = rows_out * row_bytes, rows_out * 2 * H
                ceiling = _copy_engine_time(sym._backend.heap, rank, R, d_bytes, args) if cuda else float("nan")
                impls = [("tritonep", sym, args.num_sms)] + [(name, b, args.num_sms) for name, b in variants]
                for impl, buf, sms_list in impls + [("alltoall", a2a, [0]), ("torch", plain, [0])]:
                    for num_sms in sms_list:
                        ours = impl in ("tritonep", "config", *VARIANTS)
                        sms = (num_sms or all_sms) if ours else 0
                        kw = dict(num_sms=sms) if ours else {}
                        _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, **kw)
                        y = torch.randn(handle.num_recv_tokens, H, device=device).to(torch.bfloat16)
                        ops = (lambda: buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, **kw),
                               lambda: buf.dispatch(x, handle=handle, **kw), lambda: buf.combine(y, handle, **kw))
                        t_d, t_cd, t_c = (_time(op, args.warmup, args.iters, cuda) for op in ops)
                        b2b = [_time_back_to_back(op, args.iters, cuda) for op in ops]
                        graphs = (_graph_times(buf, x, topk, w, E, handle, y, kw, args.iters)
                                  if cuda and ours and not args.no_graphs else (float("nan"),) * 4)
                        rows.append(dict(tokens=n, routing=routing, dispatch_dtype=dtype, op_peer=impl, num_sms=sms,
                                         dispatch_us=t_d, cached_dispatch_us=t_cd, combine_bf16_us=t_c,
                                         dispatch_b2b_us=b2b[0], cached_dispatch_b2b_us=b2b[1],
                                         combine_b2b_us=b2b[2], graph_dispatch_us=graphs[0],
                                         graph_cached_dispatch_us=graphs[1], graph_combine_us=graphs[2],
                                         graph_combine_nosync_us=graphs[3],
                                         dispatch_gbs=d_bytes / t_d / 1e3, combine_gbs=c_bytes / t_c / 1e3,
                                         copy_engine_us=ceiling, copy_engine_gbs=d_bytes / ceiling / 1e3,
                                         nvlink_bytes_dispatch=d_bytes, nvlink_bytes_combine=c_bytes,
                                         local_bytes_dispatch=rows_local * row_bytes, num_ranks=R))
    if rank == 0:
        print(BYTES_FORMULA)
        print(f"{R} ranks, hidden {H}, top-{K} of {E} experts; times are medians of {args.iters} whole calls, per rank")
        print("[b2b]: mean per call of calls queued back to back (DeepEP's test method), beside the isolated median;"
              " [graph]: the same for replays of CUDA graphs (dispatch without CPU sync, cached dispatch, combine,"
              " combine of a handle from a dispatch without CPU sync)")
        print(f"{'tokens':>6} {'routing':>7} {'disp':>4} {'impl':>12} {'SMs':>4} {'dispatch us':>11} {'GB/s':>6} "
              f"{'cached us':>9} {'combine us':>10} {'GB/s':>6} {'[b2b disp cached comb]':>22} {'[graph]':>20} "
              f"{'local MB':>8} {'ceiling GB/s':>12}")
        for r in rows:
            b2b = f"{r['dispatch_b2b_us']:.0f} {r['cached_dispatch_b2b_us']:.0f} {r['combine_b2b_us']:.0f}"
            graph = " ".join(f"{r[key]:.0f}" for key in ("graph_dispatch_us", "graph_cached_dispatch_us",
                                                          "graph_combine_us", "graph_combine_nosync_us"))
            print(f"{r['tokens']:>6} {r['routing']:>7} {r['dispatch_dtype']:>4} {r['op_peer']:>12} {r['num_sms']:>4} "
                  f"{r['dispatch_us']:>11.0f} {r['dispatch_gbs']:>6.0f} {r['cached_dispatch_us']:>9.0f} "
                  f"{r['combine_bf16_us']:>10.0f} {r['combine_gbs']:>6.0f} {b2b:>22} {graph:>20} "
                  f"{r['local_bytes_dispatch'] / 1e6:>8.1f} {r['copy_engine_gbs']:>12.0f}")
        if args.out:
            write_rows(rows, args.out)
        if args.plot:
            plot_rows(rows, args.plot)
    for buf in [sym, a2a] + [b for _, b in variants]:
        buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
