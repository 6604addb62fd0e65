"""What a piece of GPU work launched, by the profiler: the proof that a path uses no SM."""
from __future__ import annotations

import torch


def gpu_activities(fn) -> dict:
    """``fn()`` under torch.profiler: every GPU activity it caused (kernels, memcpys, memsets), by
    name, with its count."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    # (acc_events: one cycle either way; without it torch warns that cycles clear their events)
    with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
        fn()
        torch.cuda.synchronize()
    names: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names[e.name] = names.get(e.name, 0) + 1
    return names


def kernels_of(activities: dict) -> dict:
    """The kernels among ``activities`` (copies and memsets run on the copy engine, not on SMs)."""
    return {n: c for n, c in activities.items() if not n.lower().startswith(("memcpy", "memset"))}
