"""Direct mode across hosts (``allow_hybrid_mode=False``): every rank exchanges with every rank.

A call moves exactly the records of the ``alltoall`` backend, in the same order, and combines them
the same way (so the results are its results, bit for bit); only the exchange differs. Of the
blocks a rank sends (one per destination rank, in rank order), those for ranks of its own host are
written by the copy engine into the receiver's symmetric heap (0 SMs; a host ``memmove`` on CPU
ranks), the rest go through ``torch.distributed.all_to_all_single`` (NCCL / gloo). The heap spans
the host's ranks only.

Heap exchange: the host's heap is cut into one region per source rank. A round is: barrier (every
peer has read the previous round), each rank copies up to a region of rows into each peer's region
for it, barrier (everything arrived), each rank copies its regions out. The number of rounds comes
from a bound every rank knows (``T`` rows per pair of ranks, ``k * T`` for expanded rows without
intermediate reduction), so all ranks agree on it without asking; one round almost always suffices.
"""
from __future__ import annotations

import itertools

import torch

from .. import copy_engine
from .alltoall import AllToAllBackend
from .base import CombineArgs, DispatchArgs, DispatchResult
from .hybrid import host_and_rail_groups


def _starts(counts: list) -> list:
    """Where each block starts when blocks of ``counts`` rows follow one another."""
    return [0, *itertools.accumulate(counts)][:-1]


class DirectBackend(AllToAllBackend):
    name = "direct"

    def __init__(self, group, device: torch.device, num_scaleup_ranks: int, make_host_backend):
        """``make_host_backend(host_group)``: a symmetric backend over the host's ranks (its heap
        and barrier carry the blocks between them)."""
        super().__init__(group, device)
        self.U = num_scaleup_ranks
        self.host, self.u = divmod(self.rank, self.U)
        self.local = make_host_backend(host_and_rail_groups(group, self.U)[0])
        self._pair_rows = 0  # the most rows one rank may send another in the current call
        self.region_bytes = self.local.capacity // self.U  # each source's share of a receiver's heap

    @property
    def capacity(self) -> int:
        return self.local.capacity

    def dispatch(self, a: DispatchArgs) -> DispatchResult:
        self._pair_rows = a.num_max_tokens_per_rank
        return super().dispatch(a)

    def combine(self, a: CombineArgs):
        per_slot = a.expand and not a.allow_multiple_reduction
        self._pair_rows = a.num_max_tokens_per_rank * (a.topk_idx.shape[1] if per_slot else 1)
        return super().combine(a)

    def _exchange(self, rows: torch.Tensor, send_splits: list, recv_splits: list | None = None):
        if recv_splits is None:
            recv_splits = self._counts(send_splits)
        U, h = self.U, self.host
        lo, hi = sum(send_splits[:h * U]), sum(send_splits[:(h + 1) * U])
        a = sum(recv_splits[:h * U])
        inside = rows[lo:hi]
        remote_send = [0 if j // U == h else c for j, c in enumerate(send_splits)]
        remote_recv = [0 if j // U == h else c for j, c in enumerate(recv_splits)]
        outside, _ = super()._exchange(torch.cat([rows[:lo], rows[hi:]]), remote_send, remote_recv)
        here = self._heap_exchange(inside, send_splits[h * U:(h + 1) * U], recv_splits[h * U:(h + 1) * U])
        return torch.cat([outside[:a], here, outside[a:]]), recv_splits

    def _heap_exchange(self, rows: torch.Tensor, send: list, recv: list) -> torch.Tensor:
        """``rows`` (``[sum(send), B]`` uint8, a block per host rank) -> ``[sum(recv), B]``, blocks by
        source, over the host's heap."""
        U, me, B = self.U, self.u, rows.shape[1]
        rows = rows.contiguous()
        out = torch.empty((sum(recv), B), dtype=torch.uint8, device=self.device)
        s_at, r_at = _starts(send), _starts(recv)
        out[r_at[me]:r_at[me] + recv[me]] = rows[s_at[me]:s_at[me] + send[me]]
        if U == 1 or B == 0:
            return out
        heap = self.local.heap
        cap = self.region_bytes // B  # rows of one source's region
        if cap == 0:
            raise ValueError(f"rows of {B} bytes do not fit the buffer's {self.local.capacity} bytes split among "
                             f"{U} ranks: size it with get_buffer_size_hint")
        region = cap * B
        if max(send + recv) > max(self._pair_rows, 1):  # (the rounds below would leave rows behind)
            raise RuntimeError(f"rank {self.rank}: {max(send + recv)} rows between two ranks exceed the bound "
                               f"{self._pair_rows} of this call")
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        for first in range(0, max(self._pair_rows, 1), cap):
            self.local.barrier(sync=False)  # every peer has read the previous round
            for d in range(U):
                n = min(max(send[d] - first, 0), cap)
                if d != me and n:
                    copy_engine.copy_bytes(heap.data_addrs[d] + me * region, rows[s_at[d] + first].data_ptr(), n * B,
                                           stream)
            self.local.barrier(sync=False)  # every peer's rows arrived
            for s in range(U):
                n = min(max(recv[s] - first, 0), cap)
                if s != me and n:
                    out[r_at[s] + first:r_at[s] + first + n] = heap.data[s * region:s * region + n * B].view(n, B)
        if self.device.type != "cuda":
            self.local.check_status()
        return out

    def barrier(self, sync: bool = True) -> None:
        self.local.barrier(sync)
        super().barrier(sync)

    def destroy(self) -> None:
        self.local.destroy()
