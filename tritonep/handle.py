"""``EPHandle`` (routing state of one dispatch) and ``EventOverlap`` (stream synchronisation)."""
from __future__ import annotations

import dataclasses

import torch

from .layout import Layout
from .sizing import num_expanded_rows


@dataclasses.dataclass(eq=False)
class EPHandle:
    """What combine and cached dispatch need from a dispatch. Shapes (n = tokens this rank sent,
    k = num_topk, M = received tokens, R = num_ranks, L = num_local_experts):

    * ``do_expand``: bool, whether the dispatch returned the expanded layout
    * ``num_experts``, ``expert_alignment``, ``num_max_tokens_per_rank``, ``num_sms``: int
    * ``topk_idx``: ``[n, k]`` int64 (``topk_idx_t``), a copy unless ``do_handle_copy=False``
    * ``num_recv_tokens``: int (M, or ``R * T`` without CPU sync); ``num_expanded_tokens``: int, the
      rows an expanded dispatch of the same routing returns (exact when synced, else the worst case),
      whether this dispatch expanded or not (as DeepEP)
    * ``num_recv_tokens_per_expert_list``: list[int], ``align(count, expert_alignment)`` per local expert
    * ``psum_num_recv_tokens_per_scaleup_rank``: ``[R]`` int32, inclusive prefix sum of received
      tokens per source rank (one scale-up domain: every rank is a scale-up peer)
    * ``psum_num_recv_tokens_per_expert``: ``[L]`` int32, inclusive prefix sum of aligned counts (expand
      mode: the end of each expert's filled rows, its aligned start plus its count; spec 2.5)
    * ``num_unaligned_recv_tokens_per_expert``: ``[L]`` int32
    * ``recv_src_metadata``: ``[M, k + 2]`` int32. Column 0: global source index
      ``src_rank * T + token``. Column 1 (tritonep): the combine slot, i.e. the rank of this rank
      among the token's destinations in ascending order of their highest top-k slot (DeepEP keeps
      ``src_rank * k + s_max`` there). Columns 2..: unused in normal mode.
    * ``dst_buffer_slot_idx``: ``[n, k]`` int32, ``rank * T + slot`` at each destination's highest slot
    * ``token_metadata_at_forward``, ``channel_linked_list``, ``cached_recv_src_metadata_before_sort``:
      None (DeepEP's hybrid-mode and deterministic-sort fields, at DeepEP's positions)
    * ``combine_slot_idx``: ``[n, k]`` int32 (tritonep), the combine slot of each top-k entry, -1 if empty
    * ``send_counts``: ``[R, 1 + L]`` int32 (tritonep), tokens and (token, expert) pairs per destination
    """

    do_expand: bool
    num_experts: int
    expert_alignment: int
    num_max_tokens_per_rank: int
    num_sms: int
    topk_idx: torch.Tensor
    num_recv_tokens: int
    num_expanded_tokens: int
    num_recv_tokens_per_expert_list: list
    psum_num_recv_tokens_per_scaleup_rank: torch.Tensor
    psum_num_recv_tokens_per_expert: torch.Tensor
    num_unaligned_recv_tokens_per_expert: torch.Tensor
    recv_src_metadata: torch.Tensor
    dst_buffer_slot_idx: torch.Tensor
    #: DeepEP's hybrid-mode bookkeeping (None inside one scale-up domain), kept at DeepEP's positions
    token_metadata_at_forward: None = None
    channel_linked_list: None = None
    cached_recv_src_metadata_before_sort: None = None
    #: tritonep: ``[n, k]`` int32, the combine slot of each top-k entry (-1 if empty)
    combine_slot_idx: torch.Tensor | None = None
    #: tritonep: ``[R, 1 + L]`` int32, tokens and (token, expert) pairs sent to each rank
    send_counts: torch.Tensor | None = None
    #: identifies the ElasticBuffer that made this handle (a handle is only valid there)
    buffer_id: int = -1
    #: tritonep: ``psum_num_recv_tokens_per_scaleup_rank`` as a host list when the dispatch synced
    #: with the CPU (cached dispatch then copies rows out with the copy engine), else None
    host_psum: list | None = None
    #: tritonep: what the backend keeps for this handle's cached dispatches and combines (the
    #: all-to-all backend: its send order and row counts, so that they skip the count exchange)
    backend_state: object = None
    #: tritonep: recorded launches of this handle's cached dispatches and combines, by kind of
    #: call (:mod:`tritonep.eager`)
    plans: dict = dataclasses.field(default_factory=dict, repr=False)


class CompletedEvent:
    """Stands for an event that has already happened (CPU ranks run every operation synchronously)."""

    def query(self) -> bool:
        return True


class EventOverlap:
    """Wraps an event recorded on the communication stream after an asynchronous operation.

    ``current_stream_wait()`` makes the current stream wait for it; ``with event:`` does the same on
    exit. ``event`` is a ``torch.cuda.Event``, a :class:`CompletedEvent` (CPU ranks), or None when the
    operation was not asynchronous (then waiting is an error, as in DeepEP).
    """

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors
        #: called once by the next wait (``register_hook_after_wait``), then cleared
        self.hook_after_wait = None
        self._release = False

    def current_stream_wait(self, release_handle: bool = False) -> None:
        if self.event is None:
            raise RuntimeError("EventOverlap.current_stream_wait: this event holds no CUDA event "
                               "(the operation was not asynchronous)")
        if isinstance(self.event, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(self.event)
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None
            self.extra_tensors = None

    def register_hook_after_wait(self, fn) -> None:
        if self.hook_after_wait is not None:
            raise RuntimeError("EventOverlap: a hook is already registered")
        self.hook_after_wait = fn

    def __call__(self, release_handle: bool = False) -> "EventOverlap":
        self._release = release_handle
        return self

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc) -> None:
        if self.event is not None:
            self.current_stream_wait(self._release)
        self._release = False


def expanded_rows(psum_per_expert: torch.Tensor, alignment: int, rows: int) -> tuple:
    """Which of ``rows`` expand-mode output rows hold a token: ``(valid, padding)``, ``[rows]`` bool
    each, on the psum's device. Expert ``i`` owns rows ``[start_i, start_i + align(c_i))`` with
    ``start_i + c_i = psum[i]`` (``psum_num_recv_tokens_per_expert``): its first ``c_i`` rows are
    valid, the rest up to its aligned end are padding; rows past the last expert's aligned end
    (worst-case outputs) are neither."""
    filled = psum_per_expert.to(torch.int64)
    ends = (filled + alignment - 1) // alignment * alignment  # aligned segment ends
    r = torch.arange(rows, device=filled.device)
    seg = torch.searchsorted(ends, r, right=True)
    inside = seg < len(ends)
    before_fill = r < filled[seg.clamp(max=len(ends) - 1)]
    return inside & before_fill, inside & ~before_fill


def zero_padding(res, psum_per_expert: torch.Tensor, alignment: int) -> None:
    """Zero the alignment padding rows of an expand-mode result (data, scales, weights), on the
    device (:func:`expanded_rows`)."""
    _, pad = expanded_rows(psum_per_expert, alignment, res.recv_x.shape[0])
    res.recv_x.view(torch.uint8).masked_fill_(pad[:, None], 0)
    if res.recv_sf is not None:
        res.recv_sf.masked_fill_(pad[:, None], 0)
    if res.recv_topk_weights is not None:
        res.recv_topk_weights.masked_fill_(pad, 0.0)


def layout_of(handle: EPHandle) -> Layout:
    """The routing layout a handle carries (for combine and cached dispatch)."""
    return Layout(handle.dst_buffer_slot_idx, handle.combine_slot_idx, handle.send_counts, None)


def handle_from_dispatch(res, topk_idx, do_handle_copy: bool, do_expand: bool, E: int, A: int, T: int, num_sms: int,
                         num_ranks: int, buffer_id: int, fresh: list) -> EPHandle:
    """The handle of a fresh dispatch from the backend's ``DispatchResult``; tensors it allocates
    here go to ``fresh`` (the caller records them on its stream)."""
    unaligned = res.num_recv_tokens_per_expert
    psum_per_expert = res.psum_per_expert
    if psum_per_expert is None:
        aligned = (unaligned + (A - 1)) // A * A
        psum_per_expert = aligned.cumsum(0)
        if do_expand:  # spec 2.5: start_i + c_i
            psum_per_expert = psum_per_expert - aligned + unaligned
        psum_per_expert = psum_per_expert.to(torch.int32)
        fresh.append(psum_per_expert)
    handle_topk = res.topk_idx_copy
    if handle_topk is None:
        handle_topk = topk_idx.clone() if do_handle_copy else topk_idx
        fresh.append(handle_topk)
    fields = host_fields(res.host_counts, num_ranks, T, topk_idx.shape[1], E // num_ranks, A)
    if do_expand and not res.host_counts:  # (the worst case, or fewer rows: num_max_recv_tokens)
        fields["num_expanded_tokens"] = res.recv_x.shape[0]
    return EPHandle(
        do_expand=bool(do_expand), num_experts=E, expert_alignment=A, num_max_tokens_per_rank=T, num_sms=num_sms,
        topk_idx=handle_topk, num_recv_tokens=res.recv_src_metadata.shape[0],
        psum_num_recv_tokens_per_scaleup_rank=res.psum, psum_num_recv_tokens_per_expert=psum_per_expert,
        num_unaligned_recv_tokens_per_expert=unaligned, recv_src_metadata=res.recv_src_metadata,
        dst_buffer_slot_idx=res.layout.dst_buffer_slot_idx, combine_slot_idx=res.layout.combine_slot_idx,
        send_counts=res.layout.send_counts, buffer_id=buffer_id, backend_state=res.backend_state,
        **fields)


def host_fields(host_counts, num_ranks: int, T: int, k: int, L: int, A: int) -> dict:
    """The handle's fields that come from a synced dispatch's host counts (``(psum per source,
    count per local expert)`` lists, or None without a sync)."""
    if not host_counts:
        # DeepEP computes it whatever do_expand is: exact when synced, else the worst case
        return dict(num_expanded_tokens=num_expanded_rows(None, num_ranks * T, k, L, A),
                    num_recv_tokens_per_expert_list=[], host_psum=None)
    # (one pass over the local experts: a synced dispatch pays this Python on every call)
    aligned = list(host_counts[1]) if A == 1 else [(c + A - 1) // A * A for c in host_counts[1]]
    return dict(num_expanded_tokens=sum(aligned), num_recv_tokens_per_expert_list=aligned, host_psum=host_counts[0])
