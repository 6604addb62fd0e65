"""Dispatch kernels for expand mode and the in-kernel FP8 cast: one (token, destination) per
program iteration. Plain rows take the tiled path in :mod:`.dispatch`; both run after the
layout and count exchange of :mod:`.layout`. Two launches (each either only produces or only
waits, which the interpreter needs; see ``kernels/__init__.py``):

1. ``push``: every program waits until each peer has released its receive buffer from the
   previous operation (``freed == seq - 1``), then copies its share of tokens into
   ``peer.data[(rank * T + slot) * slot_bytes]`` for each destination (casting to FP8 on the way
   when asked), and the last program raises ``ready = seq`` on every peer.
2. ``epilogue``: waits for ``ready == seq``, copies received slots, ordered by source rank then
   slot (or, expanded, to each (token, local expert) position), into the output tensors, and the
   last program raises ``freed = seq`` on every peer.

Shapes: ``x`` ``[n, H]`` viewed as ``[n, x_words]`` int32; ``sf`` ``[n, P]`` 4-byte packs, any
strides; ``topk_idx`` ``[n, k]`` int64; ``topk_weights`` ``[n, k]`` float32;
``dst_buffer_slot_idx`` / ``combine_slot_idx`` ``[n, k]`` int32 from the layout.

Worked example (R=2, T=4, k=2, L=2, this rank 1, one token ``x=[a, b]`` with
``topk_idx=[[3, 0]]``, ``dst_buffer_slot_idx=[[4, 4]]``): the push writes the slot
``[a, b | 3, 0 | w0, w1 | src=4 | j]`` at slot 4 of both ranks' buffers; rank 0's epilogue, with
``psum=[.., ..+1]``, copies it to its output row after its rows from rank 0, and reports
``recv_topk_idx = [-1, 0]`` (expert 3 is not local there, expert 0 is local expert 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size
from .launch import launch
from .primitives import (OP_DISPATCH_RECV, OP_DISPATCH_SEND, copy_words, end_op, finish_op, int32_ptr, op_seq, poisoned,
                         record_overflow, rows_verdict, wait_peers)
from .dispatch import ALL_ROWS
from .quant import quantize_row


@triton.jit(do_not_specialize=["num_tokens"])
def _dispatch_push_kernel(
    x_ptr, sf_ptr, sf_stride_t, sf_stride_p, topk_ptr, w_ptr, dst_slot_ptr, cslot_ptr, erank_ptr,
    data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, num_tokens, num_topk, num_local_experts, T,
    x_words, num_sf, slot_bytes, off_sf, off_meta, ready_word, freed_word, timeout_ns, hidden,
    HAS_SF: tl.constexpr, HAS_WEIGHTS: tl.constexpr, EXPAND: tl.constexpr,
    QUANT: tl.constexpr, ROUND: tl.constexpr, QGROUPS: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SF: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, prev_seq = op_seq(seq_ptr)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns, OP_DISPATCH_SEND,
                    seq, BLOCK_R)
    n_eff = tl.where(ok, num_tokens, 0)

    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < num_topk
    offs_sf = tl.arange(0, BLOCK_SF)
    msf = offs_sf < num_sf
    for t in range(pid, n_eff, nprog):
        t64 = tl.cast(t, tl.int64)
        row_k = t64 * num_topk
        for s in range(num_topk):
            slot = tl.load(dst_slot_ptr + row_k + s)
            if slot >= 0:
                e = tl.load(topk_ptr + row_k + s)
                d = (e // num_local_experts).to(tl.int32)
                dst = tl.load(data_ptrs + d) + slot.to(tl.int64) * slot_bytes
                if QUANT:  # bf16 in, fp8 + per-128-channel scales out (kernels/quant.py)
                    quantize_row(x_ptr.to(tl.pointer_type(tl.bfloat16)) + t64 * hidden, dst, off_sf, hidden, ROUND,
                                 QGROUPS)
                else:
                    copy_words(x_ptr + t64 * x_words, int32_ptr(dst), x_words, BLOCK)
                    if HAS_SF:
                        sf = tl.load(sf_ptr + t64 * sf_stride_t + offs_sf * sf_stride_p, mask=msf)
                        tl.store(int32_ptr(dst + off_sf + offs_sf * 4), sf, mask=msf)
                meta = dst + off_meta
                ids = tl.load(topk_ptr + row_k + offs_k, mask=mk, other=-1)
                tl.store(int32_ptr(meta + offs_k * 4), ids.to(tl.int32), mask=mk)
                if HAS_WEIGHTS:
                    w = tl.load(w_ptr + row_k + offs_k, mask=mk, other=0.0)
                    tl.store((meta + (num_topk + offs_k) * 4).to(tl.pointer_type(tl.float32)), w, mask=mk)
                tl.store(int32_ptr(meta + 2 * num_topk * 4), (rank * T + t).to(tl.int32))
                tl.store(int32_ptr(meta + (2 * num_topk + 1) * 4), tl.load(cslot_ptr + row_k + s))
                if EXPAND:
                    er = tl.load(erank_ptr + row_k + offs_k, mask=mk, other=-1)
                    tl.store(int32_ptr(meta + (2 * num_topk + 2 + offs_k) * 4), er, mask=mk)

    finish_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, ready_word + rank, seq, BLOCK_R)


@triton.jit
def _dispatch_epilogue_kernel(
    data_ptrs, signal_ptrs, counter_ptr, status_ptr, psum_ptr, base_ptr,
    recv_x_ptr, recv_sf_ptr, recv_sf_stride_t, recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr,
    rank, num_ranks, seq_ptr, num_topk, num_local_experts, T, out_rows, x_words, num_sf, slot_bytes, off_sf, off_meta,
    ready_word, freed_word, timeout_ns, over_word, announced_word,
    WAIT: tl.constexpr, HAS_SF: tl.constexpr, HAS_WEIGHTS: tl.constexpr, EXPAND: tl.constexpr,
    POS_FROM_META: tl.constexpr, CAPPED: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_SF: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    if WAIT:  # cached dispatch has no count kernel that already waited
        ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, ready_word, seq, timeout_ns, OP_DISPATCH_RECV,
                        seq, BLOCK_R)
    else:
        ok = poisoned(status_ptr) == 0
    if CAPPED:  # every rank's verdict on its rows (the gather kernels announce them)
        ok = ok & wait_peers(signal_ptrs, status_ptr, rank, num_ranks, announced_word, seq, timeout_ns,
                             OP_DISPATCH_RECV, seq, BLOCK_R)
        first, need = rows_verdict(signal_ptrs, rank, num_ranks, over_word, BLOCK_R)
    base = tl.load(data_ptrs + rank)
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < num_topk
    offs_sf = tl.arange(0, BLOCK_SF)
    msf = offs_sf < num_sf
    meta_cols = num_topk + 2
    start = 0
    # Rows from source s are output rows [psum[s-1], psum[s]) and its receive slots 0, 1, ...
    for s in range(0, tl.where(ok, num_ranks, 0)):
        end = tl.load(psum_ptr + s)
        for slot in range(pid, end - start, nprog):
            i64 = tl.cast(start + slot, tl.int64)
            src = base + (tl.cast(s, tl.int64) * T + slot) * slot_bytes
            meta = src + off_meta
            if EXPAND:
                # one output row per (token, local expert); metadata column 2 + j records where
                for j in range(num_topk):
                    e = tl.load(int32_ptr(meta + j * 4))
                    local_e = e - rank * num_local_experts
                    if (e >= 0) & (local_e >= 0) & (local_e < num_local_experts):
                        if POS_FROM_META:  # cached dispatch replays the original placement
                            pos = tl.load(recv_meta_ptr + i64 * meta_cols + 2 + j)
                        else:
                            pos = tl.load(base_ptr + s * num_local_experts + local_e) \
                                + tl.load(int32_ptr(meta + (2 * num_topk + 2 + j) * 4))
                            tl.store(recv_meta_ptr + i64 * meta_cols + 2 + j, pos)
                        p64 = tl.cast(pos, tl.int64)
                        if pos < out_rows:  # (rows past the outputs: an overflow, recorded below)
                            copy_words(int32_ptr(src), recv_x_ptr + p64 * x_words, x_words, BLOCK)
                            if HAS_SF:
                                sf = tl.load(int32_ptr(src + off_sf + offs_sf * 4), mask=msf)
                                tl.store(recv_sf_ptr + p64 * recv_sf_stride_t + offs_sf * recv_sf_stride_p, sf,
                                         mask=msf)
                            if HAS_WEIGHTS:
                                tl.store(recv_w_ptr + p64,
                                         tl.load((meta + (num_topk + j) * 4).to(tl.pointer_type(tl.float32))))
                    else:
                        if not POS_FROM_META:
                            tl.store(recv_meta_ptr + i64 * meta_cols + 2 + j, -1)
            elif i64 < out_rows:
                copy_words(int32_ptr(src), recv_x_ptr + i64 * x_words, x_words, BLOCK)
                if HAS_SF:
                    sf = tl.load(int32_ptr(src + off_sf + offs_sf * 4), mask=msf)
                    tl.store(recv_sf_ptr + i64 * recv_sf_stride_t + offs_sf * recv_sf_stride_p, sf, mask=msf)
                ids = tl.load(int32_ptr(meta + offs_k * 4), mask=mk, other=-1)
                local = ids - rank * num_local_experts
                is_local = (ids >= 0) & (local >= 0) & (local < num_local_experts)
                tl.store(recv_topk_ptr + i64 * num_topk + offs_k, tl.where(is_local, local, -1).to(tl.int64),
                         mask=mk)
                if HAS_WEIGHTS:
                    w = tl.load((meta + (num_topk + offs_k) * 4).to(tl.pointer_type(tl.float32)), mask=mk)
                    tl.store(recv_w_ptr + i64 * num_topk + offs_k, w, mask=mk)
            tl.store(recv_meta_ptr + i64 * meta_cols, tl.load(int32_ptr(meta + 2 * num_topk * 4)))
            tl.store(recv_meta_ptr + i64 * meta_cols + 1, tl.load(int32_ptr(meta + (2 * num_topk + 1) * 4)))
        start = end

    last = end_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, freed_word + rank, seq, seq_ptr, BLOCK_R)
    if CAPPED:
        record_overflow(last, first, need, status_ptr, seq, BLOCK_R)


def push(*, x_words, sf, topk_idx, topk_weights, dst_buffer_slot_idx, combine_slot_idx, expert_rank,
         data_ptrs, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, num_local_experts, T,
         slot_offsets, ready_word, freed_word, timeout_ns, num_programs,
         block_words, quantize=False, round_scale=False, hidden=0, quant_groups=8):
    """Launch the push. ``x_words``: ``[n, x_words]`` int32;
    ``expert_rank`` ``[n, k]`` int32 for expand mode (else None). ``quantize``: ``x_words`` is a bf16
    row of ``hidden`` channels quantized to fp8 + scales on the way (``slot_offsets`` for fp8 rows)."""
    n, k = topk_idx.shape
    off_sf, off_meta, slot_bytes = slot_offsets
    num_sf = sf.shape[1] if sf is not None else 0
    sf = sf.view(torch.int32) if sf is not None else None  # scale packs travel as opaque 4-byte words
    groups = block_size(hidden // 128)
    dummy = status
    launch(_dispatch_push_kernel, num_programs,
        x_words, sf if sf is not None else dummy, sf.stride(0) if sf is not None else 0,
        sf.stride(1) if sf is not None else 0, topk_idx,
        topk_weights if topk_weights is not None else dummy, dst_buffer_slot_idx, combine_slot_idx,
        expert_rank if expert_rank is not None else dummy,
        data_ptrs, signal_ptrs, counter, status,
        rank, num_ranks, seq_ptr, n, k, num_local_experts, T,
        x_words.shape[1], num_sf, slot_bytes, off_sf, off_meta, ready_word, freed_word, timeout_ns, hidden,
        HAS_SF=sf is not None, HAS_WEIGHTS=topk_weights is not None, EXPAND=expert_rank is not None, QUANT=quantize, ROUND=round_scale, QGROUPS=min(groups, quant_groups),
        BLOCK=block_words, BLOCK_R=block_size(num_ranks), BLOCK_K=block_size(k), BLOCK_SF=block_size(num_sf),
    )


def epilogue(*, data_ptrs, signal_ptrs, counter, status, psum, recv_x_words, recv_sf, recv_topk_idx,
             recv_topk_weights, recv_src_metadata, rank, num_ranks, seq_ptr, num_local_experts, T, slot_offsets,
             ready_word, freed_word, timeout_ns, wait, num_programs, block_words, expand_base=None,
             expand_from_metadata=False, out_rows=None, over_word=0, announced_word=0):
    """Launch the copy epilogue. Rows beyond ``psum[-1]`` of the outputs are left untouched.

    Expand mode: ``expand_base`` (``[R, L]`` int32 from :func:`count`) places rows and fills
    ``recv_src_metadata[:, 2:]``; with ``expand_from_metadata`` (cached dispatch) the positions are
    read from ``recv_src_metadata[:, 2:]`` instead. ``recv_topk_idx`` is then unused and
    ``recv_topk_weights`` is 1-D. ``out_rows``: the outputs' rows when fewer than the worst case
    (else None): rows past them are never written; the epilogue waits for every rank's verdict on
    its rows and records an overflow (``primitives.rows_verdict``)."""
    off_sf, off_meta, slot_bytes = slot_offsets
    k = recv_src_metadata.shape[1] - 2
    expand = expand_base is not None or expand_from_metadata
    num_sf = recv_sf.shape[1] if recv_sf is not None else 0
    recv_sf = recv_sf.view(torch.int32) if recv_sf is not None else None
    dummy = status
    launch(_dispatch_epilogue_kernel, num_programs,
        data_ptrs, signal_ptrs, counter, status, psum, expand_base if expand_base is not None else dummy,
        recv_x_words, recv_sf if recv_sf is not None else dummy,
        recv_sf.stride(0) if recv_sf is not None else 0, recv_sf.stride(1) if recv_sf is not None else 0,
        recv_topk_idx if recv_topk_idx is not None else dummy,
        recv_topk_weights if recv_topk_weights is not None else dummy, recv_src_metadata,
        rank, num_ranks, seq_ptr, k, num_local_experts, T, out_rows if out_rows is not None else ALL_ROWS,
        recv_x_words.shape[1], num_sf,
        slot_bytes, off_sf, off_meta, ready_word, freed_word, timeout_ns, over_word, announced_word,
        WAIT=wait, HAS_SF=recv_sf is not None, HAS_WEIGHTS=recv_topk_weights is not None, EXPAND=expand,
        POS_FROM_META=expand_from_metadata, CAPPED=out_rows is not None, BLOCK=block_words, BLOCK_R=block_size(num_ranks), BLOCK_K=block_size(k), BLOCK_SF=block_size(num_sf),
    )


__all__ = ["push", "epilogue"]
