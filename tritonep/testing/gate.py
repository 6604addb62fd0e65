"""Routing generators that every rank can rebuild for every other rank (seeded by rank).

``make_inputs(seed, rank, ...)`` returns ``x`` ``[n, H]`` bf16, ``topk_idx`` ``[n, k]`` int64 and
``topk_weights`` ``[n, k]`` float32, on the CPU (move them to the rank's device).
"""
from __future__ import annotations

import torch

ROUTINGS = ("uniform", "skewed", "one_expert")


def _gen(seed: int, rank: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + rank * 1_009 + salt)


def make_topk(seed: int, rank: int, num_tokens: int, num_experts: int, num_topk: int, routing: str = "uniform",
              masked_ratio: float = 0.0, hot_ratio: float = 4.0) -> torch.Tensor:
    """``[n, k]`` int64 distinct experts per row; ``masked_ratio`` of the slots become -1.

    ``skewed``: the first eighth of the experts are ``hot_ratio`` times likelier.
    ``one_expert``: every token picks expert 0 in slot 0, other slots empty.
    """
    g = _gen(seed, rank, 1)
    if routing == "one_expert":
        topk = torch.full((num_tokens, num_topk), -1, dtype=torch.int64)
        topk[:, 0] = 0
        return topk
    scores = torch.rand(num_tokens, num_experts, generator=g)
    if routing == "skewed":
        hot = max(1, num_experts // 8)
        scores[:, :hot] = scores[:, :hot] ** (1.0 / hot_ratio)
    elif routing != "uniform":
        raise ValueError(f"routing {routing!r} not in {ROUTINGS}")
    topk = scores.topk(num_topk, dim=1).indices
    if masked_ratio > 0:
        topk = torch.where(torch.rand(num_tokens, num_topk, generator=g) < masked_ratio, -1, topk)
    return topk


def make_inputs(seed: int, rank: int, num_tokens: int, hidden: int, num_experts: int, num_topk: int,
                routing: str = "uniform", masked_ratio: float = 0.0):
    g = _gen(seed, rank, 2)
    x = torch.randn(num_tokens, hidden, generator=g).to(torch.bfloat16)
    topk = make_topk(seed, rank, num_tokens, num_experts, num_topk, routing, masked_ratio)
    w = torch.rand(num_tokens, num_topk, generator=g)
    w = torch.where(topk >= 0, w, 0.0)
    return x, topk, w


def combine_input(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """A deterministic ``[M, H]`` bf16 "expert output" for received rows, rebuildable on any rank."""
    return (recv_x.float() * (0.5 + 0.25 * rank) + 0.125).to(torch.bfloat16)
