"""Engram fetch: gather table rows that live in host memory (this rank's or a peer's, mapped by
every rank of the host) into the buffer's GPU area.

Global entry ``g`` lives on rank ``g // num_entries`` at row ``g % num_entries``. A program copies
whole rows (``row_words`` int32 words); an id outside ``[0, R * num_entries)`` gives a row of
zeros (the ids are never read on the host, so there is nothing to raise there).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch import launch
from .primitives import int32_ptr


@triton.jit
def _gather_kernel(idx_ptr, src_ptrs, dst_ptr, num_rows, num_entries, num_total, row_words, BW: tl.constexpr):
    for i in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        g = tl.load(idx_ptr + i).to(tl.int64)
        ok = (g >= 0) & (g < num_total)
        g = tl.where(ok, g, 0)
        src = int32_ptr(tl.load(src_ptrs + g // num_entries) + (g % num_entries) * row_words * 4)
        for w0 in range(0, row_words, BW):
            offs = w0 + tl.arange(0, BW)
            m = offs < row_words
            v = tl.load(src + offs, mask=m & ((offs * 0 + ok.to(tl.int32)) != 0), other=0)
            tl.store(dst_ptr + (g * 0 + i) * row_words + offs, v, mask=m)  # (int64: g is)


def gather(*, indices, src_ptrs, dst_words, num_entries: int, num_ranks: int, row_words: int, programs: int):
    """``indices`` ``[rows]`` int32 global ids; ``src_ptrs`` ``[R]`` int64 (each rank's table as mapped
    here); ``dst_words`` ``[rows * row_words]`` int32."""
    rows = indices.numel()
    if rows == 0:
        return
    launch(_gather_kernel, max(1, min(rows, programs)), indices, src_ptrs, dst_words, rows, num_entries,
           num_entries * num_ranks, row_words, BW=triton.next_power_of_2(min(row_words, 4096)))
