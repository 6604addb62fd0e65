"""Randomized stress of dispatch, combine and cached dispatch against the reference, bit for bit.

Run: python tools/stress.py [--configs 10000] [--minutes 60] [--seed 1] [--ranks 2 8] [--backends symmetric alltoall]
     TRITONEP_TEST_SHARED_GPU=1 python tools/stress.py --gpu ...   (ranks sharing GPU 0)

Each launch draws a rank count in ``--ranks``, a backend and a reduction recipe, then runs
``--per-launch`` configurations from ``tritonep.testing.ep_check.random_cases`` (FP8 or BF16 input,
expert alignment, expand, synced or not, biases, async with events, empty ranks, -1 slots, uniform,
skewed and one-expert routing; cached dispatch in every case) on two buffers (rows out by copy
engine or by SMs; combine dense or in two launches). Prints a running count; stops at
``--configs`` or ``--minutes``, and at the first mismatch with its configuration (exit code 1).
CI runs a fixed-seed sample of the same cases (tests/cpu/test_dispatch_combine.py).
"""
from __future__ import annotations

import argparse
import random
import sys
import time


def _worker(info, backend, amr, seed, count):
    from tritonep import ElasticBuffer, KernelConfig, sizing
    from tritonep.testing.ep_check import random_cases, run_case

    T = 24
    num_bytes = sizing.get_buffer_size_hint(info.world_size, T, 7168, 8, allow_multiple_reduction=amr)
    bufs = [ElasticBuffer(info.group, num_bytes=num_bytes, num_max_tokens_per_rank=tokens, backend=backend,
                          allow_multiple_reduction=amr, num_gpu_timeout_secs=300,
                          config=KernelConfig(copy_engine_min_bytes=ce))
            for tokens, ce in ((T, 0), (0, -1))]
    for i, case in enumerate(random_cases(seed, info.world_size, count, max_tokens=T)):
        run_case(bufs[i % 2], case)
    for b in bufs:
        b.destroy()
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=int, default=10000)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs=2, default=[2, 8])
    p.add_argument("--per-launch", type=int, default=8)
    p.add_argument("--backends", nargs="+", default=["symmetric", "alltoall"])
    p.add_argument("--gpu", action="store_true", help="ranks share GPU 0 (set TRITONEP_TEST_SHARED_GPU=1)")
    args = p.parse_args()
    from tritonep.testing.launch import parallel_launch

    rng = random.Random(args.seed)
    done, launches, t0 = 0, 0, time.monotonic()
    while done < args.configs and time.monotonic() - t0 < args.minutes * 60:
        R = rng.randint(*args.ranks)
        backend, amr = rng.choice(args.backends), rng.random() < 0.5
        seed = args.seed * 100003 + launches
        try:
            parallel_launch(R, _worker, backend, amr, seed, args.per_launch,
                            backend="shared-gpu" if args.gpu else None)
        except Exception as e:  # noqa: BLE001 - report the configuration, then stop
            print(f"FAILED after {done} configurations: {R} ranks, backend {backend}, allow_multiple_reduction={amr},"
                  f" random_cases(seed={seed}, count={args.per_launch})\n{e}", flush=True)
            sys.exit(1)
        done += args.per_launch
        launches += 1
        print(f"{done} configurations passed ({launches} launches, {time.monotonic() - t0:.0f} s; last: {R} ranks, "
              f"{backend}, amr={amr})", flush=True)
    print(f"stress: {done} configurations passed in {time.monotonic() - t0:.0f} s, seed {args.seed}")


if __name__ == "__main__":
    main()
