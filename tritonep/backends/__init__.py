"""Backends: what moves the rows of a dispatch and a combine (:class:`~tritonep.backends.base.Backend`).

* ``symmetric``: one host whose ranks map each other's memory (the heap and the Triton kernels);
* ``hybrid``: across hosts, each token once per destination host, then the host's ``symmetric``;
* ``direct``: across hosts, every rank with every rank (same-host rows through the heap);
* ``alltoall``: ``torch.distributed.all_to_all_single`` for everything (no heap).
"""
from __future__ import annotations

import torch

from ..config import KernelConfig
from ..domains import Domains


def create_backend(name: str, group, domains: Domains, device: torch.device, num_bytes: int,
                   num_max_tokens_per_rank: int, gpu_timeout_s: float, cpu_timeout_s: float, config: KernelConfig):
    """Collective: the backend ``name`` (as :meth:`Domains.backend` chose it) over ``group``."""
    from .alltoall import AllToAllBackend

    def symmetric(over, max_tokens: int):
        from .symmetric import SymmetricBackend

        return SymmetricBackend(over, num_bytes, device, gpu_timeout_s, cpu_timeout_s, max_tokens, config)

    T, U = num_max_tokens_per_rank, domains.num_nvlink_ranks
    if name == "symmetric":
        return symmetric(group, T)
    if name == "hybrid":  # a forwarder sends up to S * T tokens inside its host
        from .hybrid import HybridBackend

        return HybridBackend(group, device, U, lambda host: symmetric(host, domains.num_rdma_ranks * T)
                             if domains.peer_access else AllToAllBackend(host, device))
    if name == "direct":
        from .direct import DirectBackend

        return DirectBackend(group, device, U, lambda host: symmetric(host, T))
    return AllToAllBackend(group, device)
