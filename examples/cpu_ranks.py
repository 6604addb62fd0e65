"""What the examples share: run a check on spawned CPU ranks and report it."""
from __future__ import annotations

import argparse


def _spawned(info, check):
    return check(info.rank, info.group, info.world_size)


def run_and_report(check, doc: str, what: str, tolerance: float = 2e-2) -> None:
    """``check(rank, group, num_ranks) -> relative error`` on ``--ranks`` CPU processes; prints
    ``what`` with the largest error and PASS or FAIL, exits 0 or 1."""
    from tritonep.testing.launch import parallel_launch

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    worst = max(parallel_launch(args.ranks, _spawned, check, backend="gloo"))
    ok = worst < tolerance
    print(f"{what} within {worst:.1e} (relative) ({'PASS' if ok else 'FAIL'})")
    raise SystemExit(0 if ok else 1)
