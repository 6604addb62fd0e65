"""``EPHandle`` (routing state of one dispatch) and ``EventOverlap`` (stream synchronisation)."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(eq=False)
class EPHandle:
    """What combine and cached dispatch need from a dispatch. Shapes (n = tokens this rank sent,
    k = num_topk, M = received tokens, R = num_ranks, L = num_local_experts):

    * ``do_expand``: bool, whether the dispatch returned the expanded layout
    * ``num_experts``, ``expert_alignment``, ``num_max_tokens_per_rank``, ``num_sms``: int
    * ``topk_idx``: ``[n, k]`` int64 (``topk_idx_t``), a copy unless ``do_handle_copy=False``
    * ``num_recv_tokens``: int (M); ``num_expanded_tokens``: int (0 without expand)
    * ``num_recv_tokens_per_expert_list``: list[int], ``align(count, expert_alignment)`` per local expert
    * ``psum_num_recv_tokens_per_scaleup_rank``: ``[R]`` int32, inclusive prefix sum of received
      tokens per source rank (one scale-up domain: every rank is a scale-up peer)
    * ``psum_num_recv_tokens_per_expert``: ``[L]`` int32, inclusive prefix sum of aligned counts
    * ``num_unaligned_recv_tokens_per_expert``: ``[L]`` int32
    * ``recv_src_metadata``: ``[M, k + 2]`` int32. Column 0: global source index
      ``src_rank * T + token``. Column 1 (tritonep): the combine slot, i.e. the rank of this rank
      among the token's destinations in ascending order of their highest top-k slot (DeepEP keeps
      ``src_rank * k + s_max`` there). Columns 2..: unused in normal mode.
    * ``dst_buffer_slot_idx``: ``[n, k]`` int32, ``rank * T + slot`` at each destination's highest slot
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
    combine_slot_idx: torch.Tensor
    send_counts: torch.Tensor
    #: identifies the ElasticBuffer that made this handle (a handle is only valid there)
    buffer_id: int = -1
    token_metadata_at_forward: None = None
    channel_linked_list: None = None
    cached_recv_src_metadata_before_sort: None = None
    #: tritonep: ``psum_num_recv_tokens_per_scaleup_rank`` as a host list when the dispatch synced
    #: with the CPU (cached dispatch then copies rows out with the copy engine), else None
    host_psum: list | None = None
    #: tritonep: what the backend keeps for this handle's cached dispatches and combines (the
    #: all-to-all backend: its send order and row counts, so that they skip the count exchange)
    backend_state: object = None


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
        self._hook = None
        self._release = False

    def current_stream_wait(self, release_handle: bool = False) -> None:
        if self.event is None:
            raise RuntimeError("EventOverlap.current_stream_wait: this event holds no CUDA event "
                               "(the operation was not asynchronous)")
        if isinstance(self.event, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(self.event)
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        if release_handle:
            self.event = None
            self.extra_tensors = None

    def register_hook_after_wait(self, fn) -> None:
        if self._hook is not None:
            raise RuntimeError("EventOverlap: a hook is already registered")
        self._hook = fn

    def __call__(self, release_handle: bool = False) -> "EventOverlap":
        self._release = release_handle
        return self

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc) -> None:
        if self.event is not None:
            self.current_stream_wait(self._release)
        self._release = False
