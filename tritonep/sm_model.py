"""How many SMs a dispatch needs to keep NVLink busy: DeepEP V2's ``get_theoretical_num_sms`` for
tritonep's kernels (one host, direct pushes).

Model (uniform gate): a token goes to ``eR = g(R)`` ranks on average (``g`` below). The push
writes each of those rows once (the rank's own rows into its outputs, the others into peers'
receive areas) and reads each from HBM once, so per token ``eR`` rows are written and read, of
which ``eR * (R - 1) / R`` cross NVLink. With ``S`` programs writing ``sm_write_gbs`` each, the
push keeps the link busy when ``S * sm_write_gbs >= nvlink_gbs * R / (R - 1)`` (the same with
``sm_read_gbs``). The answer is ``align(max(4, ceil(1.25 * S)), 2)`` capped at the device's SMs,
DeepEP's rounding; ``E`` and ``k`` cancel out of this ratio but stay in the signature.

Across hosts in hybrid mode (``S`` hosts of ``U`` ranks) the kernels run stage B only, inside a
host; stage A is NCCL's (its own SMs, not counted). A token hits ``eS = g(S)`` hosts and
``eR = g(R)`` ranks, so each record a forwarder receives goes to ``eB = eR / eS`` ranks of its host.
Records arrive at ``rdma_gbs / (1 - 1/S)`` (bytes per second of rows, the own host's records
included) and stage B writes ``eB`` times that, of which ``(U - 1) / U`` crosses NVLink. The
network is the bottleneck when that NVLink share is below ``nvlink_gbs``: then the SMs only have
to keep up with the network, ``S_sm = rdma_gbs / (1 - 1/S) * eB / sm_write_gbs``; else the one-host
model over ``U`` ranks. Example: 2 hosts x 8, top-8 of 256, 50 GB/s of network, 430 of NVLink:
``eS = 1.99``, ``eR = 6.52``, ``eB = 3.27``; records 100 GB/s, writes 327 GB/s, 286 of it over
NVLink (< 430: network-bound) -> ``S = 327 / 23 = 14.2`` -> 18 (one host of 8: 28).

Its default figures (``SM_WRITE_GBS``, ``SM_READ_GBS``, ``FALLBACK_NVLINK_GBS``) were measured on
2 x H200 (NV18): docs/benchmarks.md, "2026-11-28: where the time goes; the first tile sweep", has
the run they come from. ``nvlink_gbs``: 0.9 x the per-link rates that ``nvidia-smi nvlink -s``
reports (DeepEP's rule), else the fallback. Example: 2 ranks, 430 GB/s of links and 23 GB/s
written per SM -> ``S = 2 * 430 / 23 = 37.4`` -> 48.
"""
from __future__ import annotations

import math
import re
import subprocess

SM_WRITE_GBS = 23.0
SM_READ_GBS = 200.0
FALLBACK_NVLINK_GBS = 330.0
#: a 400 Gb/s port's line rate (one ConnectX-7 NDR port per GPU), when the NIC cannot be read
FALLBACK_RDMA_GBS = 50.0


def distinct_groups(num_groups: int, num_experts: int, num_topk: int) -> float:
    """``g(G)``: expected number of the ``G`` equal expert groups that ``k`` distinct experts drawn
    uniformly from ``E`` hit: ``G * (1 - C(E - E/G, k) / C(E, k))``."""
    if num_groups <= 0 or num_experts % num_groups:
        raise ValueError(f"num_experts ({num_experts}) must split into {num_groups} equal groups")
    per = num_experts // num_groups
    return num_groups * (1 - math.comb(num_experts - per, num_topk) / math.comb(num_experts, num_topk))


def theoretical_num_sms(num_ranks: int, num_experts: int, num_topk: int, nvlink_gbs: float, device_sms: int,
                        sm_read_gbs: float = SM_READ_GBS, sm_write_gbs: float = SM_WRITE_GBS,
                        num_scaleout_ranks: int = 1, rdma_gbs: float = 0.0) -> int:
    """The model above as a pure function (``nvlink_gbs`` > 0; ``rdma_gbs`` > 0 when
    ``num_scaleout_ranks`` > 1, hybrid mode)."""
    R, S = num_ranks, num_scaleout_ranks
    eR = distinct_groups(R, num_experts, num_topk)  # (validates the split)
    U = R // S
    if U <= 1:
        return min(4, device_sms)
    per_link_byte = U / (U - 1)  # bytes moved by SMs per byte that crosses NVLink
    moved = nvlink_gbs * per_link_byte  # what the SMs move when NVLink is the bottleneck
    if S > 1:
        fanout = eR / distinct_groups(S, num_experts, num_topk)  # ranks per record inside a host
        fed = rdma_gbs / (1 - 1 / S) * fanout  # what the network lets stage B write
        moved = min(moved, fed)
    x = max(moved / sm_write_gbs, moved / sm_read_gbs)
    num_sms = max(4, math.ceil(1.25 * x))
    num_sms += num_sms % 2
    return min(num_sms, device_sms)


def detect_nvlink_gbs(device_index: int) -> float:
    """0.9 x the sum of the per-link GB/s ``nvidia-smi nvlink -s`` reports for a GPU; 0 if unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "nvlink", "-s", "-i", str(device_index)], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0.0
    rates = [float(v) for v in re.findall(r"Link \d+:\s*([\d.]+)\s*GB/s", out)]
    return 0.9 * sum(rates)


def detect_rdma_gbs() -> float:
    """The fastest InfiniBand / RoCE port's rate in GB/s, from ``/sys/class/infiniband`` (what
    ``ibstat`` prints); 0 if none."""
    import glob

    best = 0.0
    for path in glob.glob("/sys/class/infiniband/*/ports/*/rate"):
        try:
            with open(path) as f:
                match = re.match(r"\s*([\d.]+)\s*Gb/sec", f.read())
        except OSError:
            continue
        if match:
            best = max(best, float(match.group(1)) / 8)
    return best
