"""Routing layout of one dispatch, computed from ``topk_idx`` with plain torch ops (no host sync).

Vocabulary: ``num_tokens`` (n), ``num_topk`` (k), ``num_experts`` (E), ``num_ranks`` (R),
``num_local_experts`` (L = E / R), ``num_max_tokens_per_rank`` (T). Expert ``e`` lives on rank
``e // L``. A negative ``topk_idx`` entry is an empty slot.

A token goes once to every rank that hosts at least one of its experts. For token ``t`` and
destination rank ``d``:

* ``s_max(t, d)``: the highest top-k slot of ``t`` whose expert is on ``d`` (the *representative*
  slot of ``d``);
* ``slot(t, d)``: how many earlier tokens of this rank also go to ``d``. The token lands in
  ``d``'s receive region for this source at that slot, so received rows come out ordered by
  source rank, then source token: ascending global source index, with no sort;
* ``j(t, d)``: how many of ``t``'s destination ranks have a smaller ``s_max``. Combine sends
  ``d``'s partial result for ``t`` to combine slot ``j``, and the origin adds slots
  ``j = 0, 1, ...`` in that order, which is the top-k slot order that spec 3.4 prescribes.

Worked example (R=2, E=4, L=2, T=4, this rank = 1)::

    topk_idx = [[ 3,  0],        token 0: expert 3 (rank 1, slot 0), expert 0 (rank 0, slot 1)
                [ 1, -1],        token 1: expert 1 (rank 0), one empty slot
                [ 2,  3]]        token 2: experts 2 and 3, both on rank 1; slot 1 represents
    dst_buffer_slot_idx = [[4, 4], [5, -1], [-1, 5]]   # 1*T + slot: token 0 is slot 0 on both ranks,
                                                       # token 1 slot 1 on rank 0, token 2 slot 1 on rank 1
    combine_slot_idx    = [[0, 1], [0, -1], [0, 0]]    # rank 1 (s_max 0) before rank 0 (s_max 1)
    send_counts         = [[2, 1, 1],                  # rank 0: 2 tokens; experts 0 and 1 once each
                           [2, 1, 2]]                  # rank 1: 2 tokens; expert 2 once, expert 3 twice
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Layout:
    """Fields (n = num_tokens, k = num_topk, R = num_ranks, L = num_local_experts):

    * ``dst_buffer_slot_idx``: ``[n, k]`` int32. At the representative slot of each destination
      rank ``d``: ``rank * T + slot(t, d)``, the slot inside this rank's region of ``d``'s receive
      buffer; ``-1`` at every other slot. (DeepEP's field of the same name and meaning.)
    * ``combine_slot_idx``: ``[n, k]`` int32. For each non-empty slot: ``j(t, d)`` of the rank
      ``d`` that hosts its expert; ``-1`` for empty slots.
    * ``send_counts``: ``[R, 1 + L]`` int32. Row ``d``: tokens sent to ``d``, then the number of
      (token, slot) pairs for each of ``d``'s local experts.
    * ``is_token_in_rank``: ``[n, R]`` bool (None when rebuilt from a handle).
    * ``expert_rank``: expand mode only, ``[n, k]`` int32 from :func:`expert_ranks`, else None.
    """

    dst_buffer_slot_idx: torch.Tensor
    combine_slot_idx: torch.Tensor
    send_counts: torch.Tensor
    is_token_in_rank: torch.Tensor | None
    expert_rank: torch.Tensor | None = None


def expert_ranks(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[n, k]`` int32: for each slot, how many earlier rows select the same expert; -1 if empty.

    In expand mode a (token, expert) row lands at ``expert start + earlier sources' rows + this``,
    so rows of one expert come out in ascending global source index without a sort on the receiver.
    Example: ``[[0, 1], [1, -1], [0, 1]] -> [[0, 0], [1, -1], [1, 2]]``.
    """
    n, k = topk_idx.shape
    topk = topk_idx.to(torch.int64)
    valid = (topk >= 0) & (topk < num_experts)
    key = (torch.where(valid, topk, num_experts) * max(n, 1)
           + torch.arange(n, device=topk.device, dtype=torch.int64)[:, None]).flatten()
    order = torch.argsort(key, stable=True)
    expert_sorted = key[order] // max(n, 1)
    first = torch.searchsorted(expert_sorted, expert_sorted)
    ranks = torch.empty_like(key)
    ranks[order] = torch.arange(n * k, device=topk.device, dtype=torch.int64) - first
    return torch.where(valid, ranks.view(n, k), -1).to(torch.int32)


def compute_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rank: int,
                   num_max_tokens_per_rank: int, expand: bool = False) -> Layout:
    """Layout of this rank's tokens. ``topk_idx``: ``[n, k]`` integer, values in ``[-1, E)``."""
    n, k = topk_idx.shape
    device = topk_idx.device
    L = num_experts // num_ranks
    topk = topk_idx.to(torch.int64)
    # Ids >= E are rejected on the host when it syncs; without a host sync they must still never
    # address a rank that does not exist, so they count as empty here.
    valid = (topk >= 0) & (topk < num_experts)
    # Column R collects empty slots so that one scatter handles every slot.
    dst = torch.where(valid, topk // L, num_ranks)
    slot_ids = torch.arange(k, device=device, dtype=torch.int64).expand(n, k)
    smax = torch.full((n, num_ranks + 1), -1, dtype=torch.int64, device=device)
    smax.scatter_reduce_(1, dst, slot_ids, reduce="amax", include_self=True)
    is_rep = valid & (smax.gather(1, dst) == slot_ids)
    smax = smax[:, :num_ranks]
    is_in = smax >= 0

    # j at a representative slot = representative slots before it = ranks with a smaller s_max.
    # (A running count over k <= a few dozen columns as a product with a triangular matrix: exact in
    # fp32, one GEMM; torch's scan kernels take tens of microseconds for such short rows on GPUs.)
    upper = torch.triu(torch.ones(k, k, device=device, dtype=torch.float32))
    j_at_slot = (is_rep.to(torch.float32) @ upper).to(torch.int64) - 1
    j_of_rank = j_at_slot.gather(1, smax.clamp(min=0))  # [n, R], garbage where not is_in
    dst_r = dst.clamp(max=num_ranks - 1)
    combine_slot_idx = torch.where(valid, j_of_rank.gather(1, dst_r), -1)

    # running count over tokens, scanned along the contiguous dimension: torch's scan over the
    # outer dimension of an [n, R] matrix is far slower on GPUs
    slot_in_dst = torch.cumsum(is_in.to(torch.int64).t().contiguous(), dim=1).t() - 1  # [n, R]
    dst_slot = rank * num_max_tokens_per_rank + slot_in_dst.gather(1, dst_r)
    dst_buffer_slot_idx = torch.where(is_rep, dst_slot, -1)

    send_counts = torch.empty((num_ranks, 1 + L), dtype=torch.int64, device=device)
    send_counts[:, 0] = is_in.sum(0)
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    per_expert.scatter_add_(0, torch.where(valid, topk, num_experts).flatten(),
                            torch.ones(n * k, dtype=torch.int64, device=device))
    send_counts[:, 1:] = per_expert[:num_experts].view(num_ranks, L)
    return Layout(
        dst_buffer_slot_idx=dst_buffer_slot_idx.to(torch.int32),
        combine_slot_idx=combine_slot_idx.to(torch.int32),
        send_counts=send_counts.to(torch.int32),
        is_token_in_rank=is_in,
        expert_rank=expert_ranks(topk_idx, num_experts) if expand else None,
    )


def network_rows(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, rank: int, ranks_per_host: int,
                 hybrid: bool) -> int:
    """Token rows this rank sends to other hosts in one dispatch: ``hybrid``, one per (token,
    destination host other than its own); direct, one per (token, destination rank on another
    host). Example (4 ranks, 2 per host, 8 experts, this rank 0): a token with experts on ranks 1, 2
    and 3 costs 1 row in hybrid mode (host 1 once) and 2 in direct mode (ranks 2 and 3)."""
    L = num_experts // num_ranks
    topk = topk_idx.to(torch.int64)
    valid = (topk >= 0) & (topk < num_experts)
    owner = torch.where(valid, topk // L, num_ranks)
    unit = ranks_per_host if hybrid else 1
    dest = torch.zeros((topk.shape[0], num_ranks // unit + 1), dtype=torch.bool, device=topk.device)
    dest.scatter_(1, owner // unit if hybrid else owner, True)
    dest = dest[:, :num_ranks // unit]  # (the last column collects empty slots)
    host = rank // ranks_per_host
    mine = [h for h in range(num_ranks // unit) if (h if hybrid else h // ranks_per_host) == host]
    dest[:, mine] = False
    return int(dest.sum())
