"""Rows that cross hosts per rank in one dispatch (no GPU, no processes): hybrid mode (each token
once per destination host other than its own) against direct mode (once per destination rank on
another host), DeepSeek-V3 routing (top-8 of 256 experts, uniform), 8 ranks per host.

Run: python benchmarks/network_rows.py [--tokens 4096] [--hosts 2 4 8]
Bytes = rows x row bytes (FP8: hidden + 4 * hidden / 128; the combine sends bf16 rows, 2 * hidden).
"""
from __future__ import annotations

from bench_ep import shape_args
from tritonep.layout import network_rows
from tritonep.testing.gate import make_topk


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0], tokens=4096)
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--per-host", type=int, default=8)
    args = p.parse_args()
    n, H, E, k, U = args.tokens, args.hidden, args.experts, args.topk, args.per_host
    row = H + 4 * (H // 128)
    print(f"{n} tokens per rank, top-{k} of {E} experts, {U} ranks per host, FP8 rows of {row} B (rank 0)")
    print(f"{'hosts':>5} {'hybrid rows':>11} {'per token':>9} {'MB':>7} {'direct rows':>11} {'per token':>9} {'MB':>7}")
    for hosts in args.hosts:
        R = U * hosts
        topk = make_topk(1, 0, n, E, k)
        h, d = (network_rows(topk, E, R, 0, U, hybrid) for hybrid in (True, False))
        print(f"{hosts:>5} {h:>11} {h / n:>9.2f} {h * row / 1e6:>7.1f} {d:>11} {d / n:>9.2f} {d * row / 1e6:>7.1f}")


if __name__ == "__main__":
    main()
