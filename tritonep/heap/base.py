"""The symmetric-heap contract: every rank of a group allocates the same number of bytes, and
every rank can read and write every other rank's bytes through plain addresses.

A heap is laid out as ``[signal words | data]``. Kernels receive the base addresses as int64
tensors (``data_ptrs[r]``, ``signal_ptrs[r]``: rank ``r``'s bytes as mapped in *this* process),
never the tensors themselves: the Triton interpreter would copy a tensor argument's whole storage
on every launch.
"""
from __future__ import annotations

from typing import Protocol

import torch

#: The data area starts on this boundary, so slot offsets keep their alignment.
DATA_ALIGN = 4096


class SymmetricHeap(Protocol):
    rank: int
    world_size: int
    device: torch.device
    #: ``[num_bytes]`` uint8, this rank's data area.
    data: torch.Tensor
    #: ``[num_signal_words]`` int32, this rank's signal words (zero after creation).
    signals: torch.Tensor
    #: ``[world_size]`` int64 on ``device``: base address of each rank's data area.
    data_ptrs: torch.Tensor
    #: ``[world_size]`` int64 on ``device``: base address of each rank's signal words.
    signal_ptrs: torch.Tensor
    #: the same addresses on the host (for the copy engine, which the host drives)
    data_addrs: list
    signal_addrs: list

    def destroy(self) -> None:
        """Release this rank's mappings. Idempotent; not collective."""


def signal_area_bytes(num_signal_words: int) -> int:
    return (num_signal_words * 4 + DATA_ALIGN - 1) // DATA_ALIGN * DATA_ALIGN
