"""Scale-up and scale-out domains of a group (DeepEP V2's physical and logical domain sizes).

Ranks are laid out host-major: rank ``r`` lives on host ``r // N`` at scale-up index ``r % N``,
where ``N`` (``num_nvlink_ranks``) is the number of ranks per host and ``Rr = R / N``
(``num_rdma_ranks``) the number of hosts. A host is the ranks that can map each other's memory:
found by exchanging host names (and, on GPUs, by checking peer access), or declared with
``TRITONEP_SCALEUP_SIZE=N`` (ranks ``[kN, (k+1)N)`` form host ``k``: the way tests, CI and users
on one machine run several hosts; ranks of different declared hosts then never map each other's
memory).

Worked example: 8 ranks, ``TRITONEP_SCALEUP_SIZE=4``: ``(Rr, N) = (2, 4)``; rank 6 is on host 1 at
scale-up index 2. Host names ``[a, a, b, b, a, a, b, b]`` raise (not host-major), ``[a, a, a, b]``
raise (uneven).
"""
from __future__ import annotations

import dataclasses
import socket

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Domains:
    """``num_rdma_ranks`` (Rr, hosts) x ``num_nvlink_ranks`` (N, ranks per host) ``== num_ranks``;
    ``peer_access``: every pair of ranks of one host can load/store each other's memory."""

    num_ranks: int
    num_rdma_ranks: int
    num_nvlink_ranks: int
    peer_access: bool = True

    def logical(self, allow_hybrid_mode: bool) -> tuple[int, int]:
        """``(S, U)``: scale-out and scale-up sizes of the kernels (spec 1.2): ``(Rr, N)`` in hybrid
        mode (the ``hybrid`` backend across hosts), ``(1, R)`` in direct mode."""
        if allow_hybrid_mode and self.num_rdma_ranks > 1:
            return self.num_rdma_ranks, self.num_nvlink_ranks
        return 1, self.num_ranks

    def backend(self, asked: str, allow_hybrid_mode: bool) -> str:
        """The backend for ``asked`` (``auto``: symmetric inside one host whose ranks have peer
        access; across hosts hybrid, or direct with ``allow_hybrid_mode=False``; alltoall where
        the ranks of a host cannot map each other's memory and hybrid mode is off); raises
        ``ValueError`` for one that cannot serve these domains."""
        hosts = self.num_rdma_ranks
        if asked == "auto":
            if hosts > 1 and allow_hybrid_mode:
                return "hybrid"
            return ("alltoall" if not self.peer_access else "symmetric" if hosts == 1 else "direct")
        if asked == "symmetric" and hosts > 1:
            raise ValueError(f"the symmetric backend maps every rank's memory, but the group spans {hosts} hosts of "
                             f"{self.num_nvlink_ranks} ranks: use backend='hybrid' or 'alltoall' (or 'auto')")
        if asked == "hybrid" and (hosts == 1 or not allow_hybrid_mode):
            raise ValueError("the hybrid backend needs a group across hosts and allow_hybrid_mode=True; this group "
                             f"spans {hosts} host(s)")
        if asked == "direct" and (hosts == 1 or not self.peer_access):
            raise ValueError("the direct backend moves the rows between ranks of one host over their shared heap: it "
                             f"needs a group across hosts whose ranks map each other's memory; this group spans "
                             f"{hosts} host(s){'' if self.peer_access else ' without peer access'}")
        return asked


def hosts_from_names(names: list, scaleup_size: int = 0) -> int:
    """Ranks per host from every rank's host name (rank order), or the declared ``scaleup_size``.
    Raises ``ValueError`` for a layout that is not host-major or not even, or a declared host
    whose ranks sit on different machines (they could not map each other's memory)."""
    R = len(names)
    if scaleup_size:
        if R % scaleup_size:
            raise ValueError(f"TRITONEP_SCALEUP_SIZE={scaleup_size} does not divide the group's {R} ranks")
        for k in range(0, R, scaleup_size):
            machines = set(names[k:k + scaleup_size])
            if len(machines) > 1:
                raise ValueError(f"TRITONEP_SCALEUP_SIZE={scaleup_size} puts ranks {k}..{k + scaleup_size - 1} in one "
                                 f"host, but they run on {sorted(machines)}")
        return scaleup_size
    runs: list = []  # (host name, ranks in a row)
    for name in names:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    if len({name for name, _ in runs}) != len(runs):
        raise ValueError(f"the group's ranks are not host-major (each host's ranks must be consecutive): host of "
                         f"each rank {names}")
    sizes = {count for _, count in runs}
    if len(sizes) != 1:
        raise ValueError(f"the hosts hold different numbers of ranks ({[count for _, count in runs]}): every host "
                         "must have the same number")
    return sizes.pop()


def find_domains(group, device: torch.device, scaleup_size: int = 0) -> Domains:
    """Collective: the group's domains (two small all-gathers over ``group``)."""
    R = dist.get_world_size(group)
    me = (socket.gethostname(), device.index if device.type == "cuda" else -1)
    everyone: list = [None] * R
    dist.all_gather_object(everyone, me, group=group)
    N = hosts_from_names([name for name, _ in everyone], scaleup_size)
    ok = True
    if device.type == "cuda":
        host = dist.get_rank(group) // N
        ok = all(d == device.index or torch.cuda.can_device_access_peer(device.index, d)
                 for _, d in everyone[host * N:(host + 1) * N])
    verdicts: list = [None] * R
    dist.all_gather_object(verdicts, ok, group=group)
    return Domains(R, R // N, N, all(verdicts))


def _group_domains(group) -> Domains:
    from .envs import get_envs

    return find_domains(group, torch.device("cpu"), get_envs().TRITONEP_SCALEUP_SIZE)


def get_physical_domain_size(group) -> tuple[int, int]:
    """Collective: ``(Rr, N)`` of ``group`` without building a buffer (``TRITONEP_SCALEUP_SIZE``
    declares hosts)."""
    d = _group_domains(group)
    return d.num_rdma_ranks, d.num_nvlink_ranks


def get_logical_domain_size(group, allow_hybrid_mode: bool = True) -> tuple[int, int]:
    """Collective: ``(S, U)`` of the kernels a buffer of ``group`` runs with the default backend."""
    return _group_domains(group).logical(allow_hybrid_mode)
