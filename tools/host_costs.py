"""Host (CPU) cost of what a dispatch/combine call does, on one GPU: torch allocations, stream
calls, a Triton launch through Triton and through tritonep's launcher, and whole cached
dispatch/combine calls of a one-rank buffer (their Python by function, from cProfile).

Run: python tools/host_costs.py [--tokens 1024]   (one GPU; no torchrun)
Why: at small token counts a call waits for its host, so the per-operation host costs of the
machine decide the time; this prints them beside a pure-Python loop to compare machines.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist
import triton
import triton.language as tl


@triton.jit
def _tiny(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs, mask=offs < n)


def per_call_us(fn, iters: int = 2000) -> float:
    """Median over 20 batches of the host time per call (no device sync inside a batch)."""
    batches = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(iters // 20):
            fn()
        batches.append((time.perf_counter() - t0) * 1e6 / (iters // 20))
        torch.cuda.synchronize()
    return statistics.median(batches)


def _time_phases(buf, fn, calls: int) -> dict:
    """Host microseconds per call of ``fn`` spent inside each of the dispatch path's functions."""
    from tritonep import streams
    from tritonep.backends.symmetric import dispatch as dispatch_op
    from tritonep.kernels import layout

    backend = buf._backend
    totals: dict = {}
    targets = [(dispatch_op, "_layout"), (dispatch_op, "_gather"), (dispatch_op, "_read_host_words"),
               (backend, "host_wait"), (backend, "dispatch"), (streams, "finish"), (streams, "enter"),
               (dispatch_op.rows_kernels, "push"), (dispatch_op.rows_kernels, "epilogue"), (layout, "count"),
               (dispatch_op.layout_kernels, "gather"), (torch, "empty")]
    saved = []
    for obj, name in targets:
        inner = getattr(obj, name)
        saved.append((obj, name, inner))

        def timed(*a, _inner=inner, _key=f"{getattr(obj, '__name__', type(obj).__name__)}.{name}", **k):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                totals[_key] = totals.get(_key, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        totals["whole call"] = time.perf_counter() - t0
    finally:
        for obj, name, inner in saved:
            setattr(obj, name, inner)
    return {k: v * 1e6 / calls for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    torch.cuda.set_device(0)
    from tritonep.kernels.launch import launch

    x = torch.zeros(64, dtype=torch.int32, device="cuda")
    comm = torch.cuda.Stream()
    main_stream = torch.cuda.current_stream()
    costs = {
        "pure Python: 1000 additions in a loop": per_call_us(lambda: sum(i for i in range(1000)), 200),
        "torch.empty((1024, 7168) uint8, cuda)": per_call_us(
            lambda: torch.empty((1024, 7168), dtype=torch.uint8, device="cuda")),
        "torch.cuda.current_stream()": per_call_us(torch.cuda.current_stream),
        "stream.wait_stream(other)": per_call_us(lambda: comm.wait_stream(main_stream)),
        "tensor.record_stream(s)": per_call_us(lambda: x.record_stream(comm)),
        "tiny Triton kernel, kernel[grid](...)": per_call_us(lambda: _tiny[(1,)](x, 64, BLOCK=64)),
        "tiny Triton kernel, tritonep launch()": per_call_us(lambda: launch(_tiny, 1, x, 64, BLOCK=64)),
        "torch add (x + 1)": per_call_us(lambda: x + 1),
    }
    for name, cost in costs.items():
        print(f"  {name:<45} {cost:8.1f} us", flush=True)
    costs = {}
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    from tritonep import ElasticBuffer
    from tritonep.testing.gate import make_topk

    n, H, E, K = args.tokens, 7168, 256, 8
    buf = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=n, hidden=H, num_topk=K, backend="symmetric",
                        explicitly_destroy=True)
    topk = make_topk(7, 0, n, E, K).cuda()
    w = torch.rand(n, K, device="cuda")
    xs = (torch.randn(n, H, device="cuda").to(torch.float8_e4m3fn), torch.rand(n, H // 128, device="cuda"))
    _, _, _, handle, _ = buf.dispatch(xs, topk_idx=topk, topk_weights=w, num_experts=E, num_sms=24)
    y = torch.randn(handle.num_recv_tokens, H, device="cuda").to(torch.bfloat16)
    ops = {"dispatch (1 rank)": lambda: buf.dispatch(xs, topk_idx=topk, topk_weights=w, num_experts=E, num_sms=24),
           "cached dispatch (1 rank)": lambda: buf.dispatch(xs, handle=handle, num_sms=24),
           "combine (1 rank)": lambda: buf.combine(y, handle, num_sms=24)}
    for name, fn in ops.items():
        costs[f"whole {name}"] = per_call_us(fn, 400)
    for name, cost in costs.items():
        print(f"  {name:<45} {cost:8.1f} us")
    phases = _time_phases(buf, ops["dispatch (1 rank)"], 200)
    print("\nfresh dispatch (1 rank), host time per call inside each function (nested ones overlap):")
    for name, us in phases.items():
        print(f"  {name:<45} {us:8.1f} us")
    for name, fn in ops.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
        print(f"\n=== Python of 200 {name} calls (cProfile, by own time) ===")
        print("\n".join(line[:150] for line in text.getvalue().splitlines()
                        if line.strip() and "Ordered by" not in line and "List reduced" not in line))
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
