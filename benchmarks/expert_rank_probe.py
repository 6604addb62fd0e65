"""One GPU, no peer: expand mode's expert ranks (``kernels/layout.expert_ranks``, two Triton
launches) against the torch reference (``tritonep.layout.expert_ranks``) they replaced: equal
outputs, GPU time (CUDA events) and host time per call (queued behind a sleeping GPU).

Why: an expanded dispatch computes them before its push, on the critical path; the kernels take
the host cost of a dozen torch operations away and let the call be replayed (docs/benchmarks.md,
"Host cost of eager calls"), but their per-block prefix grows with the token count.

Run: python benchmarks/expert_rank_probe.py [--tokens 128 1024 4096 8192] [--experts 256] [--topk 8]
(CPU: a smoke test of the equality)
"""
from __future__ import annotations

import statistics
import time

import torch

from tritonep.kernels import layout as kernels
from tritonep.layout import expert_ranks
from tritonep.testing.gate import make_topk

from bench_ep import shape_args
from probe_common import time_us


def _host_us(fn, calls: int = 50, batches: int = 9) -> float:
    out = []
    for _ in range(batches):
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(out)


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0])
    p.set_defaults(tokens=[128, 1024, 4096, 8192])
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    print(f"{torch.cuda.get_device_name() if gpu else 'CPU (interpreter)'}; top-{args.topk} of {args.experts}")
    for n in args.tokens:
        topk = make_topk(5, 0, n, args.experts, args.topk).to(dev)
        out = torch.full((n, args.topk), -7, dtype=torch.int32, device=dev)
        counts = torch.empty(max(1, kernels.expert_rank_words(n, args.topk, args.experts)), dtype=torch.int32,
                             device=dev)

        def kern():
            kernels.expert_ranks(topk_idx=topk, num_experts=args.experts, out=out, counts=counts)

        def ref():
            return expert_ranks(topk, args.experts)

        kern()
        same = "identical" if torch.equal(out, ref()) else "DIFFER"
        if not gpu:
            print(f"  {n:6d} tokens: {same}")
            continue
        print(f"  {n:6d} tokens: {same}; kernels GPU {time_us(kern, lambda: None, args.iters):7.1f} us, "
              f"host {_host_us(kern):6.1f} us | torch GPU {time_us(ref, lambda: None, args.iters):7.1f} us, "
              f"host {_host_us(ref):6.1f} us")


if __name__ == "__main__":
    main()
