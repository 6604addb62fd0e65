"""What every dispatch/combine backend takes and returns. Backends receive validated inputs."""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from ..layout import Layout


@dataclasses.dataclass
class CachedLayout:
    """What cached dispatch reuses from its handle."""

    psum: torch.Tensor  # [R] int32, inclusive prefix of received tokens per source
    num_recv_tokens: int
    recv_src_metadata: torch.Tensor  # [M, k + 2] int32; expand mode reads columns 2..
    num_expanded_tokens: int
    host_psum: list | None = None  # psum on the host (a synced dispatch's), else None
    backend_state: object = None  # what the backend kept in the handle (DispatchResult.backend_state)


@dataclasses.dataclass
class DispatchArgs:
    """``x``: ``[n, H]`` (bf16, or fp8 data with ``sf`` ``[n, P]`` 4-byte packs); ``topk_idx``:
    ``[n, k]`` int64; ``topk_weights``: ``[n, k]`` float32 or None. For cached dispatch ``cached``
    is the handle's :class:`CachedLayout` and ``layout`` is the handle's; otherwise ``layout`` is
    None and the backend computes it (and returns it in :class:`DispatchResult`).

    ``expand``: one output row per (token, local expert), expert segments aligned to
    ``expert_alignment`` (spec 2.6); ``recv_topk_weights`` is then 1-D and ``recv_topk_idx`` None."""

    x: torch.Tensor
    sf: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor | None
    layout: Layout | None
    num_experts: int
    num_max_tokens_per_rank: int
    num_sms: int
    sf_col_major: bool = False
    cached: CachedLayout | None = None
    expand: bool = False
    expert_alignment: int = 1
    #: bf16 ``x`` is cast to fp8 + per-128-channel float32 scales by the dispatch (``sf`` is None)
    quantize: bool = False
    round_scale: bool = False
    #: False: no host sync; outputs get the worst-case R * T rows, true counts stay on the device
    cpu_sync: bool = True
    #: without a host sync: rows of the outputs (received tokens, or expanded rows in expand mode)
    #: when fewer than the worst case; a dispatch that needs more records an overflow (None: worst case)
    recv_capacity: int | None = None
    #: called right before the copy epilogue is queued (``previous_event_before_epilogue``)
    before_epilogue: object = None
    #: a backend may return a copy of ``topk_idx`` in ``DispatchResult.topk_idx_copy`` (else the caller clones)
    copy_topk: bool = False


@dataclasses.dataclass
class DispatchResult:
    """``recv_*`` have M rows; ``recv_src_metadata`` ``[M, k + 2]`` int32 (columns 0 and 1 set);
    ``psum``: ``[R]`` int32 inclusive prefix of tokens per source; ``num_recv_tokens_per_expert``:
    ``[L]`` int32 (None for cached dispatch); ``host_counts``: ``(psum list, per-expert list)`` or None.
    Expand mode: ``recv_x``/``recv_sf``/``recv_topk_weights`` have the expanded rows and
    ``recv_src_metadata[:, 2:]`` their positions; ``recv_topk_idx`` is None."""

    recv_x: torch.Tensor
    recv_sf: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    recv_src_metadata: torch.Tensor
    psum: torch.Tensor
    num_recv_tokens_per_expert: torch.Tensor | None
    host_counts: tuple | None
    #: the routing layout the dispatch used (computed by the backend unless cached)
    layout: Layout | None = None
    #: ``[L]`` int32 ``psum_num_recv_tokens_per_expert`` when the backend computed it (else the caller does)
    psum_per_expert: torch.Tensor | None = None
    #: a copy of ``topk_idx`` for the handle when ``DispatchArgs.copy_topk`` and the backend made it
    topk_idx_copy: torch.Tensor | None = None
    #: every tensor the backend allocated for this call (one per storage), to record on the caller's
    #: stream; None: record every output
    allocations: tuple | None = None
    #: anything the backend wants back in this handle's cached dispatches and combines (opaque)
    backend_state: object = None


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
    #: expand-mode handle: ``x`` holds expanded rows at ``recv_src_metadata[:, 2:]`` (``topk_weights`` 1-D)
    expand: bool = False
    #: expand mode: reduce a token's rows on the expert rank first (spec 3.4 level 1)
    allow_multiple_reduction: bool = True
    #: ``psum`` on the host (the handle's, from a synced dispatch), else None
    host_psum: list | None = None
    #: the handle's ``DispatchResult.backend_state``
    backend_state: object = None
    #: ``combined_topk_weights`` as V1's ``Buffer.combine``: each token's returned weight rows summed
    #: over its destination ranks (fp32, combine-slot order) instead of each slot's owner's weight
    sum_weights: bool = False


class Backend(Protocol):
    name: str
    #: whether its calls can be captured in CUDA graphs
    can_capture: bool
    #: whether a fresh synced dispatch checks the expert ids itself (else the caller reads them first)
    checks_routing_on_device: bool
    #: bytes one call may use (``sizing.dispatch_bytes`` / ``combine_bytes``); None: no limit
    capacity: int | None

    def dispatch(self, args: DispatchArgs) -> DispatchResult: ...

    def combine(self, args: CombineArgs) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def barrier(self, sync: bool = True) -> None: ...

    def destroy(self) -> None: ...


def new_recv_sf(rows: int, num_packs: int, dtype: torch.dtype, device, col_major: bool) -> torch.Tensor:
    """``[rows, P]`` output scales; column-major with the token stride padded to 4 when asked (spec 2.3)."""
    if col_major:
        return torch.empty_strided((rows, num_packs), (1, (rows + 3) // 4 * 4), dtype=dtype, device=device)
    return torch.empty((rows, num_packs), dtype=dtype, device=device)
