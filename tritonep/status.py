"""A buffer's status words: where its kernels record the first wait that timed out, on the device,
and the copy of them in host memory that the same kernel writes, so that the host learns of the
timeout at the buffer's next call without a device sync.

Device words (int32[8]): ``[code, peer, seq, 0, host address (int64, words 4-5), 0, 0]``; the
kernels' ``primitives.record_timeout`` writes the first three, then the same three to the host
address (the code last, with a system-scope release). Codes: ``errors.OP_NAMES``.
"""
from __future__ import annotations

import ctypes
import platform

import torch

from .errors import raise_recorded

#: int32 words of a buffer's device status
STATUS_WORDS = 8


class StatusWords:
    """``tensor``: the device words (pass it as the kernels' ``status``); ``host``: int32[4] in host
    memory (pinned on GPUs) that a kernel writes when it records a timeout."""

    def __init__(self, device: torch.device):
        self.host = torch.zeros(4, dtype=torch.int32, pin_memory=device.type == "cuda")
        words = torch.zeros(STATUS_WORDS, dtype=torch.int32)
        words.view(torch.int64)[2] = self.host.data_ptr()
        self.tensor = words.to(device)
        # read through ctypes: a tensor element read is a torch call, this a memory read
        self._words = (ctypes.c_int32 * 4).from_address(self.host.data_ptr())

    def failed(self) -> bool:
        """Whether a kernel of this buffer recorded a timeout that has reached host memory."""
        return self._words[0] != 0

    def check(self, rank: int, timeout_s: float, what: str = "operation") -> None:
        """Raise :class:`tritonep.errors.CommTimeoutError` if :meth:`failed`."""
        if self._words[0]:
            raise_recorded(list(self._words), rank, timeout_s, what)


#: whether this host's loads are never reordered with older loads (x86): then the counts read after
#: :meth:`CountWords.ready` saw the counter are the gather's. Elsewhere (e.g. aarch64) host waits
#: ask the stream instead, whose completion orders them (``SymmetricBackend.host_wait``).
ORDERED_LOADS = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


class CountWords:
    """``words`` int32 words in host memory (pinned on GPUs) that the gather kernel of a synced
    dispatch writes (its counts, then the four status words), a counter that the kernel raises
    after them with a system-scope release, and the last value of that counter the host took.
    The host polls the counter instead of asking the stream: a memory read, no driver call."""

    def __init__(self, words: int, device: torch.device):
        self.words = words
        self.tensor = torch.zeros(words + 2, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._words = (ctypes.c_int32 * (words + 2)).from_address(self.tensor.data_ptr())

    def ready(self) -> bool:
        """Whether a gather wrote the words since the last :meth:`take`."""
        w = self._words
        return w[self.words] != w[self.words + 1]

    def take(self) -> list:
        """The words the last gather wrote (call once :meth:`ready`)."""
        w, n = self._words, self.words
        w[n + 1] = w[n]
        return w[:n]


__all__ = ["STATUS_WORDS", "ORDERED_LOADS", "StatusWords", "CountWords"]
