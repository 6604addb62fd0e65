"""Randomized stress of every communication API against the reference, bit for bit.

Run: python tools/stress.py [--configs 10000] [--minutes 60] [--seed 1] [--ranks 2 8]
     [--families elastic hosts v1 low_latency pp agrs] [--backends symmetric alltoall]
     TRITONEP_TEST_SHARED_GPU=1 python tools/stress.py --gpu ...   (ranks sharing GPU 0)

Each launch draws a rank count in ``--ranks`` and a family, then runs ``--per-launch``
configurations of it on fresh buffers:

* ``elastic``: ``ElasticBuffer`` dispatch, combine and cached dispatch on one host
  (``tritonep.testing.ep_check.random_cases``: FP8 or BF16 input, expert alignment, expand, synced
  or not (some with the tightest num_max_recv_tokens), biases, async with events, empty ranks, -1
  slots, uniform, skewed and one-expert routing), a backend from ``--backends`` and a reduction
  recipe, on two buffers (rows out by copy engine or by SMs; combine dense or in two launches);
* ``hosts``: the same across declared hosts (``TRITONEP_SCALEUP_SIZE``: hybrid mode), even rank
  counts of 4 or more;
* ``v1``: DeepEP V1's ``Buffer`` in normal mode (layout, dispatch with and without top-k, FP8,
  ``num_worst_tokens``, cached dispatch, combine with biases, async with events);
* ``low_latency``: V1's low-latency dispatch and combine (BF16, FP8 with power-of-two or UE8M0
  scales, hooks, zero-copy, wait counters, an expert named twice in a row, the tightest
  ``num_max_recv_tokens_per_expert``);
* ``pp``: pipeline send/recv to both ring neighbours, in flight up to a random slot count;
* ``agrs``: all-gather sessions on a random schedule, then reduce-scatter.

Prints a running count; stops at ``--configs`` or ``--minutes``, and at the first mismatch with its
configuration (exit code 1). CI runs fixed-seed samples of the same checks (tests/cpu).
"""
from __future__ import annotations

import argparse
import random
import sys
import time

#: how often each family is drawn (ElasticBuffer, the main API, most)
WEIGHTS = {"elastic": 6, "hosts": 2, "v1": 2, "low_latency": 2, "pp": 1, "agrs": 1}


def _elastic(info, seed, count, backend, amr):
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


def _hosts(info, seed, count, scaleup, amr):
    import os

    os.environ["TRITONEP_SCALEUP_SIZE"] = str(scaleup)  # (before the first buffer reads it)
    from tritonep import ElasticBuffer
    from tritonep.testing.ep_check import random_cases, run_case

    buf = ElasticBuffer(info.group, num_bytes=2 << 20, num_max_tokens_per_rank=16, allow_multiple_reduction=amr,
                        num_gpu_timeout_secs=300)
    assert buf.backend == "hybrid", buf.backend
    for case in random_cases(seed, info.world_size, count, max_tokens=16):
        run_case(buf, case)
    buf.destroy()
    return count


def _v1(info, seed, count):
    from tritonep import Buffer
    from tritonep.testing.legacy_check import LegacyCase, run_legacy_case

    R, rng = info.world_size, random.Random(seed)
    buf = Buffer(info.group, num_nvl_bytes=4 << 20, explicitly_destroy=True)
    for i in range(count):
        E = R * rng.choice((1, 2, 4))
        async_mode = rng.random() < 0.3
        case = LegacyCase(seed * 31 + i, [rng.choice((0, rng.randint(1, 12), 12)) for _ in range(R)],
                          rng.choice((128, 256)), E, rng.randint(1, min(8, E)),
                          rng.choice(("uniform", "skewed", "one_expert")), rng.choice((0.0, 0.1, 0.3)),
                          with_topk=rng.random() < 0.7, fp8=rng.random() < 0.4, num_bias=rng.randint(0, 2),
                          worst=rng.random() < 0.3, async_mode=async_mode,
                          previous_event=async_mode and rng.random() < 0.5)
        run_legacy_case(buf, case)
    buf.destroy()
    return count


def _low_latency(info, seed, count):
    from tritonep import Buffer
    from tritonep.testing.low_latency_check import LLCase, run_ll_case

    R, rng = info.world_size, random.Random(seed)
    T, H, E = 16, 512, 4 * R
    buf = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                 num_qps_per_rank=E // R, explicitly_destroy=True)
    for i in range(count):
        fp8 = rng.random() < 0.5
        round_scale = fp8 and rng.random() < 0.5
        k = rng.randint(1, min(8, E))
        hook = rng.random() < 0.5  # (V1 refuses a hook with async_finish)
        case = LLCase(seed * 31 + i, [rng.choice((0, rng.randint(1, T), T)) for _ in range(R)], T, H, E, k,
                      masked_ratio=rng.choice((0.0, 0.2)), use_fp8=fp8, round_scale=round_scale,
                      use_ue8m0=round_scale and rng.random() < 0.5, hook=hook, zero_copy=rng.random() < 0.3,
                      async_mode=not hook and rng.random() < 0.3, wait_stats=rng.random() < 0.2,
                      repeat=k > 1 and rng.random() < 0.2, cap="tight" if rng.random() < 0.3 else None)
        run_ll_case(buf, case)
    buf.destroy()
    return count


def _pp(info, seed, count):
    from tritonep import ElasticBuffer
    from tritonep.testing.pp_check import run_pp_exchange

    rng = random.Random(seed)
    buf = ElasticBuffer(info.group, num_bytes=2 << 20, num_gpu_timeout_secs=60, explicitly_destroy=True)
    for _ in range(count):
        # (two ranks: each round sends twice to the one neighbour before receiving, and a send
        # waits for a free slot, so one slot would leave both ranks waiting: a timeout, as it should)
        run_pp_exchange(buf, rng.randint(1, 5), rng.randint(2 if info.world_size == 2 else 1, 4))
    buf.destroy()
    return count


def _agrs(info, seed, count):
    import torch

    from tritonep import ElasticBuffer
    from tritonep.testing.agrs_check import run_agrs_schedule, run_reduce_scatter

    rng = random.Random(seed)
    shape = (rng.randint(1, 6), rng.choice((8, 16)), rng.choice((16, 32)))
    max_calls = rng.randint(2, 4)
    session = ElasticBuffer.get_agrs_num_max_session_bytes(info.group, [shape] * 3 * max_calls, torch.bfloat16)
    buf = ElasticBuffer(info.group, num_bytes=ElasticBuffer.get_agrs_buffer_size_hint(info.group, session),
                        num_gpu_timeout_secs=60, explicitly_destroy=True)
    buf.agrs_set_config(session, max_calls)
    for i in range(count):
        run_agrs_schedule(buf, seed * 31 + i, rng.randint(4, 24), shape, max_calls)
        run_reduce_scatter(buf, seed * 31 + i, shape)
    buf.destroy()
    return count


FAMILIES = {"elastic": _elastic, "hosts": _hosts, "v1": _v1, "low_latency": _low_latency, "pp": _pp, "agrs": _agrs}


def _draw(rng: random.Random, families: list, ranks: tuple, backends: list):
    """``(family, rank count, extra arguments of its worker)``."""
    family = rng.choices(families, [WEIGHTS[f] for f in families])[0]
    lo, hi = ranks
    if family == "hosts":  # even rank counts of 4 or more, two hosts or more
        choices = [r for r in range(max(lo, 4), hi + 1) if r % 2 == 0]
        if not choices:
            return _draw(rng, [f for f in families if f != "hosts"] or ["elastic"], ranks, backends)
        R = rng.choice(choices)
        return family, R, (rng.choice([s for s in (2, R // 2) if R // s >= 2]), rng.random() < 0.5)
    R = rng.randint(lo, hi)
    if family == "elastic":
        return family, R, (rng.choice(backends), rng.random() < 0.5)
    return family, R, ()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=int, default=10000)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs=2, default=[2, 8])
    p.add_argument("--per-launch", type=int, default=8)
    p.add_argument("--families", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    p.add_argument("--backends", nargs="+", default=["symmetric", "alltoall"])
    p.add_argument("--gpu", action="store_true", help="ranks share GPU 0 (set TRITONEP_TEST_SHARED_GPU=1)")
    args = p.parse_args()
    from tritonep.testing.launch import parallel_launch

    rng = random.Random(args.seed)
    done, launches, t0 = 0, 0, time.monotonic()
    per_family: dict = {}
    while done < args.configs and time.monotonic() - t0 < args.minutes * 60:
        family, R, extra = _draw(rng, args.families, tuple(args.ranks), args.backends)
        seed = args.seed * 100003 + launches
        try:
            parallel_launch(R, FAMILIES[family], seed, args.per_launch, *extra,
                            backend="shared-gpu" if args.gpu else None)
        except Exception as e:  # noqa: BLE001 - report the configuration, then stop
            print(f"FAILED after {done} configurations: {family} on {R} ranks, seed {seed}, "
                  f"{args.per_launch} configurations, arguments {extra}\n{e}", flush=True)
            sys.exit(1)
        done += args.per_launch
        launches += 1
        per_family[family] = per_family.get(family, 0) + args.per_launch
        print(f"{done} configurations passed ({launches} launches, {time.monotonic() - t0:.0f} s; last: {family}, "
              f"{R} ranks, {extra})", flush=True)
    counts = ", ".join(f"{f} {n}" for f, n in sorted(per_family.items()))
    print(f"stress: {done} configurations passed in {time.monotonic() - t0:.0f} s, seed {args.seed} ({counts})")


if __name__ == "__main__":
    main()
