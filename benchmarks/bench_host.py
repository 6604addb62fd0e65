"""Host cost of eager dispatch and combine calls, beside their wall and GPU times.

Run: python benchmarks/bench_host.py [--ranks 2] [--tokens 128] [--phases] [--cprofile N] [--out FILE]
(``--floor``: only the floor table below, in one process)

Spawns ``--ranks`` processes; each takes a GPU of its own when the machine has enough, else they
all share GPU 0 (the output says which: on a shared GPU the host times hold, the GPU and wall
times include the other rank's turn on the GPU). Per operation, rank by rank:

* **host**: host microseconds per call while the GPU is held back by a sleep kernel queued first,
  so no call waits for the GPU (median of batches); for a synced dispatch, which must wait for its
  counts, the call's time minus its wait for them; each call twice: replaying the launches
  recorded from its first call of the kind (the default, :mod:`tritonep.eager`), and the full path;
* **wall**: one isolated call, from a barrier until its GPU work finished (median);
* **GPU**: the GPU activities of an isolated call, summed (torch.profiler);
* **host part**: wall minus GPU.

``--phases`` adds a breakdown of the queued calls' host time by function (validation, routing
layout, kernel launches, allocations, stream and event calls, the host read of the counts);
nested phases overlap. The first table is the host's floor on this machine: a pure-Python loop,
a torch allocation, stream calls, an empty Triton kernel through ``kernel[grid]``, through
tritonep's launcher (its parameter buffer, and Triton's compiled launcher) and through a bare
``cuLaunchKernel`` (``cuda.bindings``, when installed), measured first and again at the end: the
host times come before any GPU profile (torch.profiler's hooks in the driver may stay after it),
and the second column shows what the profiles left behind. ``--no-packed`` launches every reused
kernel through Triton's compiled launcher (what tritonep did before its parameter buffers), for
comparison. ``--ops`` keeps the calls whose names contain one of its words; ``--spin-ms 1 1000``
adds each synced dispatch's host time with the host polling its counts that long before it sleeps
between polls (after a sleep the host's next microseconds may run slower). The floor's rows
``4 torch.empty + a launch`` time the same host work with no wait before it and right after the
host waited ~2 ms (for the GPU, polling with or without sleeps, or in a plain ``time.sleep``).
``--pin`` puts each rank on a physical core of its own; ``--ranks 1`` is the case where one rank
has one GPU, whose wall and GPU columns compare. The report lists what each recorded plan replays
(launches and allocations, before and after a synced dispatch's count read).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs, mask=offs < n)


@triton.jit
def _wide_kernel(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16, p17, p18, p19,
                 i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19,
                 BLOCK: tl.constexpr):
    """As many parameters as tritonep's dispatch kernels (pointers and integers)."""
    offs = tl.arange(0, BLOCK)
    tl.store(p0 + offs, i0 + i19 + offs, mask=offs < 1)


def _bare_launch():
    """A ``cuLaunchKernel`` of the compiled empty kernel through cuda.bindings, or None."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    import ctypes

    x = torch.zeros(64, dtype=torch.int32, device="cuda")
    compiled = _empty_kernel[(1,)](x, 64, BLOCK=64)
    compiled._init_handles()
    func = driver.CUfunction(compiled.function)
    stream = torch.cuda.current_stream().cuda_stream
    # Triton's kernels take two scratch pointers after the user's arguments
    params = ((x.data_ptr(), 64, 0, 0), (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p))
    threads = 32 * compiled.metadata.num_warps
    shared = compiled.metadata.shared

    def launch():
        driver.cuLaunchKernel(func, 1, 1, 1, threads, 1, 1, shared, stream, params, 0)

    return launch


def _per_call_us(fn) -> float:
    return _queued_us(fn, calls=100, batches=15, collective=False)[0]


_OUTPUTS = (((256, 7168), torch.bfloat16), ((256, 8), torch.int64), ((256, 8), torch.float32),
            ((8192,), torch.int32))  # (2 ranks, 128 tokens each, top-8, hidden 7168; layout words)


def _four_allocations():
    return [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in _OUTPUTS]


def _one_allocation_four_views():
    sizes = [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in _OUTPUTS]
    block = torch.empty(sum(sizes), dtype=torch.uint8, device="cuda")
    out, start = [], 0
    for (shape, dtype), size in zip(_OUTPUTS, sizes):
        out.append(block[start:start + size].view(dtype).view(shape))
        start += size
    return out


def _after_wait_us(wait: str) -> float:
    """Host microseconds of a no-sync dispatch's 4 output allocations and one empty launch, right
    after the host waited ~2 ms: for the GPU, polling an event without pause ("spin") or with a
    50 us sleep between polls ("sleep"), or in a plain ``time.sleep`` with no GPU work ("cpu");
    "none": the same work with no wait before it (median of 25)."""
    x = torch.zeros(64, dtype=torch.int32, device="cuda")
    event, times = torch.cuda.Event(), []
    for _ in range(25):
        torch.cuda.synchronize()
        if wait in ("spin", "sleep"):
            torch.cuda._sleep(4_000_000)  # ~2 ms on an H100-class GPU
            event.record()
            while not event.query():
                if wait == "sleep":
                    time.sleep(50e-6)
        elif wait == "cpu":
            time.sleep(2e-3)
        t0 = time.perf_counter()
        _four_allocations()
        _empty_kernel[(1,)](x, 64, BLOCK=64)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def floor_table() -> list:
    from tritonep.kernels.launch import Launcher, launch

    through_triton = Launcher(_empty_kernel, packed=False)
    wide, wide_triton = Launcher(_wide_kernel), Launcher(_wide_kernel, packed=False)
    wide_args = (*[torch.zeros(64, dtype=torch.int32, device="cuda") for _ in range(20)], *range(2, 22))

    x = torch.zeros(64, dtype=torch.int32, device="cuda")
    other = torch.cuda.Stream()
    event = torch.cuda.Event()
    rows = [
        ("pure Python: sum of 1000 integers", _per_call_us(lambda: sum(range(1000)))),
        ("torch.empty((128, 7168), bf16, cuda)",
         _per_call_us(lambda: torch.empty((128, 7168), dtype=torch.bfloat16, device="cuda"))),
        ("torch.empty_strided((128, 7168), (7168, 1))",
         _per_call_us(lambda: torch.empty_strided((128, 7168), (7168, 1), dtype=torch.bfloat16, device="cuda"))),
        ("a no-sync dispatch's 4 outputs, 4 torch.empty", _per_call_us(_four_allocations)),
        ("  the same, 1 torch.empty and 4 views", _per_call_us(_one_allocation_four_views)),
        ("torch.cuda.current_stream()", _per_call_us(torch.cuda.current_stream)),
        ("stream.wait_stream(other)", _per_call_us(lambda: other.wait_stream(torch.cuda.current_stream()))),
        ("event.record()", _per_call_us(event.record)),
        ("tensor.record_stream(s)", _per_call_us(lambda: x.record_stream(other))),
        ("torch add (x + 1)", _per_call_us(lambda: x + 1)),
        ("empty Triton kernel, kernel[grid](...)", _per_call_us(lambda: _empty_kernel[(1,)](x, 64, BLOCK=64))),
        ("empty Triton kernel, tritonep launch()", _per_call_us(lambda: launch(_empty_kernel, 1, x, 64, BLOCK=64))),
        ("  the same, Triton's compiled launcher", _per_call_us(lambda: through_triton(1, x, 64, BLOCK=64))),
        ("40-parameter kernel, tritonep launch()", _per_call_us(lambda: wide(1, *wide_args, BLOCK=64))),
        ("  the same, Triton's compiled launcher", _per_call_us(lambda: wide_triton(1, *wide_args, BLOCK=64))),
    ]
    for wait, label in (("none", "no wait before"), ("spin", "after a spin-polled GPU wait"),
                        ("sleep", "after a sleep-polled GPU wait"), ("cpu", "after time.sleep(2 ms)")):
        rows.append((f"4 torch.empty + a launch, {label}", _after_wait_us(wait)))
    bare = _bare_launch()
    rows.append(("empty Triton kernel, bare cuLaunchKernel",
                 _per_call_us(bare) if bare is not None else float("nan")))
    # through the parameter buffer alone, the first address rewritten (what a replay's launch does)
    for name, kernel, args in (("empty Triton kernel", _empty_kernel, (x, 64)),
                               ("40-parameter kernel", _wide_kernel, wide_args)):
        packed = _packed_launch(kernel, args)
        rows.append((f"{name}, its parameter buffer alone",
                     _per_call_us(packed) if packed is not None else float("nan")))
    return rows


def _packed_launch(kernel, args: tuple):
    """A launch of ``kernel`` through its :class:`tritonep.kernels.launch.Packed` buffer with the
    first argument's address rewritten, or None where it cannot be packed."""
    from tritonep.kernels.launch import pack

    compiled = kernel[(1,)](*args, BLOCK=64)
    call = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args] + [64]
    packed = pack(compiled, call)
    if packed is None:
        return None
    stream, addrs = torch.cuda.current_stream().cuda_stream, [args[0].data_ptr()]
    subs, items = packed.resolve([(0, 0, 0)], [])
    return lambda: packed.launch(1, stream, addrs, subs, call, items)


def _ops(R: int, n: int, max_tokens: int, hidden: int, experts: int, topk: int) -> tuple:
    """The buffers and the calls to time: name -> (fn, synced)."""
    from tritonep import ElasticBuffer
    from tritonep.testing.gate import make_topk

    rank = dist.get_rank()
    kw = dict(num_max_tokens_per_rank=max_tokens, hidden=hidden, num_topk=topk, explicitly_destroy=True)
    buf = ElasticBuffer(dist.group.WORLD, **kw)
    buf8 = ElasticBuffer(dist.group.WORLD, use_fp8_dispatch=True, **kw)
    idx = make_topk(11, rank, n, experts, topk).cuda()
    w = torch.rand(n, topk, device="cuda")
    x = torch.randn(n, hidden, device="cuda").to(torch.bfloat16)
    _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts)
    _, _, _, ehandle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts, do_expand=True)
    y = torch.randn(handle.num_recv_tokens, hidden, device="cuda").to(torch.bfloat16)
    ey = torch.randn(ehandle.num_expanded_tokens, hidden, device="cuda").to(torch.bfloat16)
    ops = {
        "dispatch, synced": (lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts), True),
        "dispatch, do_cpu_sync=False": (lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts,
                                                             do_cpu_sync=False), False),
        "cached dispatch": (lambda: buf.dispatch(x, handle=handle), False),
        "combine": (lambda: buf.combine(y, handle), False),
        "expanded dispatch, synced": (lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts,
                                                           do_expand=True), True),
        "cached expanded dispatch": (lambda: buf.dispatch(x, handle=ehandle, do_expand=True), False),
        "combine of expanded rows": (lambda: buf.combine(ey, ehandle), False),
        "FP8-cast dispatch, synced": (lambda: buf8.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts),
                                      True),
        "step: synced dispatch, its cached dispatch and combine": (lambda: _step(buf, x, idx, w, y, experts), True),
    }
    return (buf, buf8), ops


def _step(buf, x, idx, w, y, experts: int) -> None:
    """What a training step asks of one MoE layer: a synced dispatch (a new handle), then a
    cached dispatch (backward) and a combine with that handle."""
    _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=experts)
    buf.dispatch(x, handle=handle, topk_weights=w)
    buf.combine(y, handle)


def _queued_us(fn, calls: int, batches: int, collective: bool = True) -> tuple:
    """Host microseconds per call of ``calls`` calls queued behind a sleep kernel (median of
    batches), and whether the GPU was still asleep when the host finished (else the figure may
    include waits for the GPU). ``collective``: every rank calls (a barrier before each batch)."""
    times, asleep = [], True
    for _ in range(batches):
        if collective:
            dist.barrier()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s on an H100-class GPU: longer than the batch
        mark = torch.cuda.Event()
        mark.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
        asleep = asleep and not mark.query()
        torch.cuda.synchronize()
    return statistics.median(times), asleep


def _synced_host_us(fn, buffers, calls: int, batches: int) -> float:
    """Host microseconds per call of a synced dispatch, less its wait for the counts (median of batches)."""
    waited = [0.0]
    saved = [(b._backend, b._backend.host_wait) for b in buffers]

    def timed(*a, _inner, **k):
        t0 = time.perf_counter()
        try:
            return _inner(*a, **k)
        finally:
            waited[0] += time.perf_counter() - t0

    for backend, inner in saved:
        backend.host_wait = lambda *a, _inner=inner, **k: timed(*a, _inner=_inner, **k)
    times = []
    try:
        for _ in range(batches):
            dist.barrier()
            torch.cuda.synchronize()
            waited[0] = 0.0
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0 - waited[0]) * 1e6 / calls)
            torch.cuda.synchronize()
    finally:  # (back to the class's method: an instance attribute left here would hide it from --phases)
        for backend, _ in saved:
            backend.__dict__.pop("host_wait", None)
    return statistics.median(times)


def _spin_rows(fn, bufs, args) -> list:
    """A synced dispatch's host time per call (replayed, less its wait) for each ``--spin-ms``:
    how long the host polls the counts before it sleeps between polls (``core.HOST_SPIN_S``)."""
    from tritonep.backends.symmetric import core

    saved, rows = core.HOST_SPIN_S, []
    try:
        for ms in args.spin_ms:
            core.HOST_SPIN_S = ms / 1e3
            fn()
            rows.append((ms, _synced_host_us(fn, bufs, args.calls, args.batches)))
    finally:
        core.HOST_SPIN_S = saved
    return rows


def _wall_us(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _gpu_us(fn, iters: int) -> float:
    """Summed duration of the GPU activities of ``iters`` isolated calls, per call."""
    from torch.profiler import ProfilerActivity, profile

    # (acc_events: one cycle either way; without it torch warns that cycles clear their events)
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(iters):
            dist.barrier()
            torch.cuda.synchronize()
            fn()
            torch.cuda.synchronize()
    total = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total / iters


def _phase_targets() -> list:
    """``(label, object, attribute)`` of the functions a call's host time is broken down into."""
    from tritonep import buffer, checks, copy_engine, eager, replay, streams
    from tritonep.backends.symmetric.core import SymmetricBackend
    from tritonep.status import CountWords
    from tritonep.backends.symmetric import combine as combine_op
    from tritonep.backends.symmetric import dispatch as dispatch_op
    from tritonep.kernels import launch

    targets = [("validation", checks, name) for name in dir(checks)
               if callable(getattr(checks, name)) and not name.startswith("_")
               and getattr(getattr(checks, name), "__module__", "") == checks.__name__]
    targets += [("validation", buffer.ElasticBuffer, name)
                for name in ("_check_alive", "_resolve_num_sms", "_check_handle", "_check_fits")]
    targets += [("streams and events", streams, name) for name in ("caller_stream", "enter", "leave", "finish")]
    targets += [("routing layout (its launches included)", dispatch_op, "_layout"),
                ("count gather (its launch included)", dispatch_op, "_gather"),
                ("host read of the counts", dispatch_op, "_read_counts"),
                ("  the counts taken from host memory", CountWords, "take"),
                ("handle", buffer, "handle_from_dispatch"),
                ("kernel launches", launch.Launcher, "__call__"),
                ("copy-engine copies", copy_engine, "copy_rows"),
                ("copy-engine copies", copy_engine, "copy_bytes"),
                ("allocations (torch.empty)", torch, "empty"),
                ("allocations (torch.empty)", torch, "empty_strided"),
                ("replay (streams, allocations, launches)", buffer.ElasticBuffer, "_replay"),
                ("replayed launches and allocations", replay.Plan, "run"),
                ("  their launches", replay.Plan, "_launch"),
                ("  their allocations", replay.Plan, "_allocate"),
                ("  the wait for the counts (GPU time, mostly)", SymmetricBackend, "host_wait"),
                ("a replayed fresh dispatch's new handle", eager.EagerMixin, "_new_handle"),
                ("combine route", combine_op, "combine")]
    return targets


def _phases(fn, calls: int, synced: bool) -> dict:
    """Host microseconds per call inside each phase of :func:`_phase_targets`."""
    totals: dict = {}
    depth: dict = {}  # a phase that calls itself (checks calling checks) is counted once
    saved = []
    for label, obj, name in _phase_targets():
        inner = getattr(obj, name)
        saved.append((obj, name, inner))

        def timed(*a, _inner=inner, _label=label, **k):
            if depth.get(_label):
                return _inner(*a, **k)
            depth[_label] = 1
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                depth[_label] = 0
                totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)
    try:
        dist.barrier()
        torch.cuda.synchronize()
        if not synced:
            torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        totals["whole call"] = time.perf_counter() - t0
        torch.cuda.synchronize()
    finally:
        for obj, name, inner in saved:
            setattr(obj, name, inner)
    return {k: v * 1e6 / calls for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def _cprofile(fn, calls: int) -> str:
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
    return "\n".join(line[:140] for line in text.getvalue().splitlines()
                     if line.strip() and "Ordered by" not in line and "List reduced" not in line)


def _physical_cores() -> list:
    """One CPU of each physical core this process may run on (hyperthread siblings left out), by
    the kernel's topology files; all allowed CPUs where those are missing."""
    seen, cpus = set(), []
    for cpu in sorted(os.sched_getaffinity(0)):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                core = f.read().strip()
        except OSError:
            core = str(cpu)
        if core not in seen:
            seen.add(core)
            cpus.append(cpu)
    return cpus


def _rank(info, args) -> dict:
    R, rank = info.world_size, info.rank
    if args.pin:  # (a rank polling its counts slows the work of a rank on the same core's other thread)
        cores = _physical_cores()
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    if args.no_packed:
        from tritonep.kernels import launch

        launch.pack = lambda *a, **k: None
    out: dict = {"device": torch.cuda.get_device_name(), "rows": {}, "phases": {}, "profiles": {}}
    if rank == 0:
        out["floor"] = floor_table()
    dist.barrier()
    bufs, ops = _ops(R, args.tokens, args.max_tokens or args.tokens, args.hidden, args.experts, args.topk)
    if args.ops:
        ops = {name: op for name, op in ops.items() if any(part in name for part in args.ops)}
    host_figures = {}
    # every host time first: the profiler of the GPU times may leave the driver's launch path
    # slower for the rest of the process, which would then count in the host times after it
    for name, (fn, synced) in ops.items():
        figures = []
        for replays in (False, True):
            for b in bufs:
                b._replays = replays
            for _ in range(3):  # compile, warm the allocator; the first with replays records
                fn()
            if synced:
                figures.append((_synced_host_us(fn, bufs, args.calls, args.batches), True))
            else:
                figures.append(_queued_us(fn, args.calls, args.batches))
        host_figures[name] = figures
        if synced and args.spin_ms:
            out.setdefault("spin", {})[name] = _spin_rows(fn, bufs, args)
    walls = {}
    for name, (fn, synced) in ops.items():
        torch.cuda.synchronize()
        walls[name] = _wall_us(fn, args.iters)
        if args.phases:
            out["phases"][name] = _phases(fn, args.calls, synced)
        if args.cprofile:
            dist.barrier()
            out["profiles"][name] = _cprofile(fn, args.cprofile)
    for name, (fn, synced) in ops.items():  # (the profiler last: see above)
        (full, _), (host, asleep) = host_figures[name]
        out["rows"][name] = (full, host, asleep, walls[name], _gpu_us(fn, 10))
    if rank == 0:  # whether the profiler left the launch path slower
        out["floor after"] = floor_table()
    out["packed"] = _packed_steps(bufs)
    out["plans"] = _plan_sizes(bufs)
    for b in bufs:
        b.destroy()
    return out


def _recorded_plans(b) -> list:
    """``(dispatch or combine key, plan)`` of each plan buffer ``b`` recorded (a fresh dispatch's
    plan without its handle template; a shared plan's key without the handle kind)."""
    plans = [(key, plan[0] if type(plan) is tuple else plan) for key, plan in b._fresh_plans.items()]
    plans += [(key[0], plan) for key, plan in b._kind_plans.items()]
    return [(key, plan) for key, plan in plans if type(plan) is not int]  # (an int: calls without a plan yet)


def _packed_steps(bufs) -> tuple:
    """(launches in the buffers' plans, those through a parameter buffer: launch.pack)."""
    steps = [step for b in bufs for _, plan in _recorded_plans(b) for step in plan.steps]
    return len(steps), sum(step[-1] is not None for step in steps)


def _count(n: int, word: str, plural: str) -> str:
    return f"{n} {word}{'' if n == 1 else plural}"


def _plan_sizes(bufs) -> list:
    """What each recorded plan of the buffers replays: a line per plan, its launches and allocations
    (before and after the host read of the counts, for a synced dispatch)."""
    from tritonep.eager import describe_key
    lines = []
    for b, label in zip(bufs, ("bf16", "FP8")):
        for key, plan in _recorded_plans(b):
            name = describe_key(key)
            split, first = (plan.pause[0], plan.pause[1]) if plan.pause else (len(plan.steps), len(plan.allocations))
            after = (f" ({_count(len(plan.steps) - split, 'launch', 'es')} and "
                     f"{_count(len(plan.allocations) - first, 'allocation', 's')} after the count read)"
                     if plan.pause else "")
            lines.append(f"  {label} buffer, {name}: {_count(len(plan.steps), 'launch', 'es')}, "
                         f"{_count(len(plan.allocations), 'allocation', 's')}" + after)
    return lines


def _report(results: list, args, shared: bool) -> str:
    lines = []
    R = len(results)
    where = f"{R} ranks sharing GPU 0" if shared else ("one rank on GPU 0" if R == 1 else f"{R} ranks, one GPU each")
    where += ", each pinned to a physical core of its own" if args.pin else ""
    lines.append(f"# {results[0]['device']}, {where}; hidden {args.hidden}, top-{args.topk} of {args.experts}, "
                 f"{args.tokens} tokens per rank (buffer for {args.max_tokens or args.tokens}), bf16 input"
                 + ("; launches through Triton's compiled launcher (--no-packed)" if args.no_packed else ""))
    total, packed = results[0]["packed"]
    lines.append(f"\nRank 0's plans hold {total} launches, {packed} of them through a parameter buffer (launch.pack).")
    lines += ["\nWhat rank 0's plans replay:", *results[0]["plans"]]
    lines.append("\n## The host's floor (rank 0, host us per call)\n")
    lines.append(f"  {'':<45} {'first':>8} {'after the GPU profiles':>24}")
    for (name, us), (_, after) in zip(results[0]["floor"], results[0]["floor after"]):
        lines.append(f"  {name:<45} {us:8.1f} {after:24.1f}")
    lines.append("\n## Per call, us (host: host time per call, queued behind a sleeping GPU, or for a synced "
                 "dispatch less its wait for the counts; full path: the same without replaying recorded launches; "
                 "wall: an isolated call; GPU: its activities summed)\n")
    head = "| call | " + " | ".join(f"rank {r} host | full path | wall | GPU" for r in range(R)) + " |"
    lines.append(head)
    lines.append("| --- |" + " ---: |" * (4 * R))
    for name in results[0]["rows"]:
        cells = []
        for res in results:
            full, host, asleep, wall, gpu = res["rows"][name]
            cells += [f"{host:.0f}" + ("" if asleep else " (GPU woke)"), f"{full:.0f}",
                      f"{wall:.0f}", f"{gpu:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "spin" in results[0]:
        lines.append("\n## Synced dispatches: host us per call (replayed, less the wait) by how long the host "
                     "polls the counts before it sleeps between polls (--spin-ms)\n")
        for name in results[0]["spin"]:
            cells = [f"{ms:g} ms: " + " / ".join(f"{res['spin'][name][i][1]:.0f}" for res in results)
                     for i, (ms, _) in enumerate(results[0]["spin"][name])]
            lines.append(f"  {name:<45} " + ", ".join(cells) + "   (rank " + " / ".join(map(str, range(R))) + ")")
    for name, phases in results[0]["phases"].items():
        lines.append(f"\n## {name}: host us per call by phase, rank 0 (nested phases overlap)\n")
        for label, us in phases.items():
            lines.append(f"  {label:<45} {us:8.1f}")
    for name, text in results[0]["profiles"].items():
        lines.append(f"\n## {name}: Python of {args.cprofile} calls, rank 0 (cProfile, by own time)\n")
        lines.append(text)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=0, help="the buffers' num_max_tokens_per_rank (0: --tokens)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--calls", type=int, default=20, help="calls per queued batch")
    p.add_argument("--batches", type=int, default=15)
    p.add_argument("--iters", type=int, default=30, help="isolated calls for the wall time")
    p.add_argument("--phases", action="store_true")
    p.add_argument("--cprofile", type=int, default=0, metavar="N")
    p.add_argument("--no-packed", action="store_true", help="reused kernels through Triton's launcher")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--pin", action="store_true", help="each rank on a physical core of its own (CPU affinity)")
    p.add_argument("--floor", action="store_true", help="only the floor table, in this process")
    p.add_argument("--ops", nargs="*", default=None, help="only the calls whose names contain one of these")
    p.add_argument("--spin-ms", type=float, nargs="*", default=None,
                   help="also time each synced dispatch with the host polling its counts this many milliseconds "
                        "before it sleeps between polls (several values: one row each)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark measures the host cost of GPU calls: it needs a GPU")
    if args.floor:
        print(f"# {torch.cuda.get_device_name()}: the host's floor, host us per call")
        for name, us in floor_table():
            print(f"  {name:56s} {us:7.1f}")
        return
    from tritonep.testing.launch import parallel_launch

    shared = torch.cuda.device_count() < args.ranks
    results = parallel_launch(args.ranks, _rank, args, backend="shared-gpu" if shared else "nccl", timeout=1200)
    text = _report(results, args, shared)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
