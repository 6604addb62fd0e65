"""Tile helpers shared by the dispatch and combine kernels: a token block's routes, a row copier,
and how a launch that both sends and receives splits its programs. No memory ordering here (that is
:mod:`.primitives`)."""
from __future__ import annotations

import triton.language as tl

from .primitives import device_fn


@device_fn
def routes(topk_ptr, t, mt, num_topk, num_experts, num_local_experts, num_ranks, BK: tl.constexpr):
    """Expert ids of tokens ``t`` (``[BT]``, ``mt`` in range): ``ids`` ``[BT, BK]`` int64 (-1 where
    masked), ``valid`` (``0 <= id < num_experts``), ``dest`` rank (``num_ranks`` where not valid)."""
    offs_k = tl.arange(0, BK)
    m2 = tl.expand_dims(mt, 1) & tl.expand_dims(offs_k < num_topk, 0)
    ptrs = topk_ptr + tl.expand_dims(t.to(tl.int64) * num_topk, 1) + tl.expand_dims(offs_k, 0)
    ids = tl.load(ptrs, mask=m2, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    dest = tl.where(valid, ids // num_local_experts, num_ranks).to(tl.int32)
    return ids, valid, dest


@device_fn
def copy_tile_rows(src_rows, dst_rows, on, num_words, BW: tl.constexpr, AHEAD: tl.constexpr):
    """Copy ``num_words`` int32 words of rows ``src_rows[i] -> dst_rows[i]`` (``[BT]`` int32 pointers,
    16-byte aligned) where ``on[i]``, ``BW`` words of every row at a time. ``AHEAD``: the next ``BW``
    words are loaded before these are stored, two steps of loads in flight per program instead of
    one (a store waits for its load)."""
    offs = tl.arange(0, BW)
    src2 = tl.expand_dims(src_rows, 1)
    dst2 = tl.expand_dims(dst_rows, 1)
    on2 = tl.expand_dims(on, 1)
    if AHEAD:
        ahead = tl.load(src2 + tl.expand_dims(offs, 0), mask=on2 & tl.expand_dims(offs < num_words, 0))
    for c in range(0, num_words, BW):
        cols = c + offs
        m = on2 & tl.expand_dims(cols < num_words, 0)
        if AHEAD:
            v = ahead
            nxt = cols + BW  # (past the row's end on the last step: masked, no memory traffic)
            ahead = tl.load(src2 + tl.expand_dims(nxt, 0), mask=on2 & tl.expand_dims(nxt < num_words, 0))
        else:
            v = tl.load(src2 + tl.expand_dims(cols, 0), mask=m)
        tl.store(dst2 + tl.expand_dims(cols, 0), v, mask=m)


def senders(num_programs: int, share: float) -> int:
    """Programs of a launch that both sends and receives that send: ``share`` of them, at least one,
    leaving one."""
    return max(1, min(num_programs - 1, round(num_programs * share)))


__all__ = ["routes", "copy_tile_rows", "senders"]
