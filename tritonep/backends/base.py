"""What every dispatch/combine backend takes and returns. Backends receive validated inputs."""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from ..layout import Layout


@dataclasses.dataclass
class DispatchArgs:
    """``x``: ``[n, H]`` (bf16, or fp8 data with ``sf`` ``[n, P]`` 4-byte packs); ``topk_idx``:
    ``[n, k]`` int64; ``topk_weights``: ``[n, k]`` float32 or None. For cached dispatch ``cached``
    holds ``(psum [R] int32 on device, num_recv_tokens)`` of the handle, and ``layout`` is the handle's."""

    x: torch.Tensor
    sf: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor | None
    layout: Layout
    num_experts: int
    num_max_tokens_per_rank: int
    num_sms: int
    sf_col_major: bool = False
    cached: tuple | None = None
    #: False: no host sync; outputs get the worst-case R * T rows, true counts stay on the device
    cpu_sync: bool = True
    #: called right before the copy epilogue is queued (``previous_event_before_epilogue``)
    before_epilogue: object = None


@dataclasses.dataclass
class DispatchResult:
    """``recv_*`` have M rows; ``recv_src_metadata`` ``[M, k + 2]`` int32 (columns 0 and 1 set);
    ``psum``: ``[R]`` int32 inclusive prefix of tokens per source; ``num_recv_tokens_per_expert``:
    ``[L]`` int32 (None for cached dispatch); ``host_counts``: ``(psum list, per-expert list)`` or None."""

    recv_x: torch.Tensor
    recv_sf: torch.Tensor | None
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor | None
    recv_src_metadata: torch.Tensor
    psum: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor | None
    host_counts: tuple | None


@dataclasses.dataclass
class CombineArgs:
    """``x``: ``[M, H]`` bf16, one row per received token; ``topk_weights``: ``[M, k]`` float32 or
    None; ``bias``: tuple of 0-2 ``[n, H]`` bf16; the rest comes from the handle."""

    x: torch.Tensor
    topk_weights: torch.Tensor | None
    bias: tuple
    topk_idx: torch.Tensor
    layout: Layout
    recv_src_metadata: torch.Tensor
    psum: torch.Tensor
    num_max_tokens_per_rank: int
    num_experts: int
    num_sms: int
    #: called right before the reduction is queued (``previous_event_before_epilogue``)
    before_epilogue: object = None


class Backend(Protocol):
    name: str

    def dispatch(self, args: DispatchArgs) -> DispatchResult: ...

    def combine(self, args: CombineArgs) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def barrier(self, sync: bool = True) -> None: ...

    def destroy(self) -> None: ...


def new_recv_sf(rows: int, num_packs: int, dtype: torch.dtype, device, col_major: bool) -> torch.Tensor:
    """``[rows, P]`` output scales; column-major with the token stride padded to 4 when asked (spec 2.3)."""
    if col_major:
        return torch.empty_strided((rows, num_packs), (1, (rows + 3) // 4 * 4), dtype=dtype, device=device)
    return torch.empty((rows, num_packs), dtype=dtype, device=device)
