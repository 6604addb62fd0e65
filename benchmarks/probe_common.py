"""Helpers of the one-GPU probes (``push_probe.py``, ``reduce_probe.py``): a peer's signal area on
this device, and event timing."""
from __future__ import annotations

import statistics

import torch

from tritonep.status import STATUS_WORDS


class FakePeers:
    """Signal areas of a 2-rank group on one device, for calling a receive kernel as ``rank``
    without a peer: :meth:`arm` makes every peer ``ready`` for operation 1 and raises every flag
    (``flags`` words per sender from word 16) to -1, as if every copy had landed."""

    def __init__(self, dev, rank: int, flags: int, R: int = 2):
        self.rank, self.flags, self.R = rank, flags, R
        self.sig = [torch.zeros(16 + R * flags, dtype=torch.int32, device=dev) for _ in range(R)]
        self.signal_ptrs = torch.tensor([s.data_ptr() for s in self.sig], dtype=torch.int64, device=dev)
        self.counter = torch.zeros(4, dtype=torch.int32, device=dev)
        # (the kernels' status words: int32[8], words 4-5 a host address or 0, see tritonep.status)
        self.status = torch.zeros(STATUS_WORDS, dtype=torch.int32, device=dev)
        self.seq = torch.zeros(1, dtype=torch.int32, device=dev)
        self.words = dict(signal_ptrs=self.signal_ptrs, counter=self.counter, status=self.status, rank=rank,
                          num_ranks=R, seq_ptr=self.seq, flags_word=16, ready_word=0, freed_word=2,
                          timeout_ns=10**10)

    def arm(self):
        self.seq.zero_()
        self.sig[self.rank][0:2] = 1
        self.sig[self.rank][16:16 + self.R * self.flags].fill_(-1)

    def checks(self) -> dict:
        return {"flags zeroed": int(self.sig[self.rank][16:].abs().sum()) == 0,
                "freed raised": self.sig[0][2 + self.rank].item() == 1,
                "status": int(self.status.abs().sum()) == 0}


def time_us(fn, arm, iters: int) -> float:
    """Median of ``iters`` timed calls of ``fn`` (CUDA events), each after ``arm``, after 5 more."""
    times = []
    for i in range(iters + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        arm()
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
