"""Combine of expanded rows (``do_expand=True`` handles): send each received token's rows back to its
origin, reduced first on this rank (spec 3.4) or one per (token, slot), then reduce there in fp32.
Plain rows take :mod:`.combine` / :mod:`.combine_dense`.

Two launches (producer, then waiter; see ``kernels/__init__.py``):

1. ``push``: every program waits until each peer has released its buffer (``freed == seq - 1``);
   received row ``i`` (global source index ``g = s * T + t`` and combine slot ``j`` from
   ``recv_src_metadata[i, :2]``) goes to ``peer_s.data[(j * T + t) * slot_bytes]`` with its
   ``k`` weights; the last program raises ``ready = seq`` on every peer.
2. ``reduce``: waits for ``ready == seq`` from every peer; for token ``t`` with ``ndist``
   destination ranks (``max(combine_slot_idx[t]) + 1``):
   ``out[t] = bf16(((float(b0) + float(b1)) + float(slot_0)) + float(slot_1) + ...)``, where without
   bias ``slot_0`` starts the sum. Slots ``j`` are in ascending order of each rank's highest
   top-k slot, which is spec 3.4's order, so the result is bit-exact against the reference.
   ``combined_topk_weights[t, s]`` is read from slot ``combine_slot_idx[t, s]``; the last program
   raises ``freed = seq`` on every peer.

Shapes: ``x`` ``[rows, H]`` bf16 viewed as ``[rows, H/2]`` int32; ``topk_weights`` ``[rows, k]``
float32; ``recv_src_metadata`` ``[rows, k + 2]`` int32; ``psum`` ``[R]`` int32 (valid rows =
``psum[-1]``); ``combine_slot_idx`` ``[n, k]`` int32; ``bias`` ``[n, H]`` bf16; output
``[n, H]`` bf16 and ``[n, k]`` float32.

Worked example (k=2, no bias): a token whose slot 0 expert is on rank 1 and slot 1 expert on rank 0
has ``combine_slot_idx = [0, 1]``: rank 1's partial arrives in slot 0, rank 0's in slot 1, and
``out = bf16(float(p_rank1) + float(p_rank0))``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import block_size
from .launch import launch
from .primitives import (OP_COMBINE_RECV, OP_COMBINE_SEND, copy_words, end_op, finish_op, int32_ptr, op_seq, to_bf16,
                         wait_peers)


@triton.jit
def _combine_push_kernel(
    x_ptr, w_ptr, meta_ptr, psum_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, num_topk, T, x_words, slot_bytes, off_w, ready_word, freed_word, timeout_ns,
    HAS_WEIGHTS: tl.constexpr, EXPAND: tl.constexpr, PER_SLOT: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, prev_seq = op_seq(seq_ptr)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns, OP_COMBINE_SEND,
                    seq, BLOCK_R)
    offs_r = tl.arange(0, BLOCK_R)
    psum = tl.load(psum_ptr + offs_r, mask=offs_r < num_ranks, other=0)
    n_rows = tl.where(ok, tl.max(psum), 0)
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < num_topk
    hidden = 2 * x_words
    xb_ptr = x_ptr.to(tl.pointer_type(tl.bfloat16))
    for i in range(pid, n_rows, nprog):
        i64 = tl.cast(i, tl.int64)
        row_meta = meta_ptr + i64 * (num_topk + 2)
        g = tl.load(row_meta)
        j = tl.load(row_meta + 1)
        s = g // T
        t = g - s * T
        peer = tl.load(data_ptrs + s)
        if PER_SLOT:
            # expand mode without intermediate reduction: each (token, slot) row goes to slot s_
            for s_ in range(num_topk):
                pos = tl.load(row_meta + 2 + s_)
                if pos >= 0:
                    dst = peer + (tl.cast(s_, tl.int64) * T + t) * slot_bytes
                    copy_words(x_ptr + tl.cast(pos, tl.int64) * x_words, int32_ptr(dst), x_words, BLOCK)
        else:
            dst = peer + (tl.cast(j, tl.int64) * T + t) * slot_bytes
            if EXPAND:
                # spec 3.4 level 1: this rank's rows of the token, fp32 in slot order, one rounding
                for c in range(0, hidden, 2 * BLOCK):
                    offs = c + tl.arange(0, 2 * BLOCK)
                    acc = tl.zeros([2 * BLOCK], dtype=tl.float32)
                    started = offs < 0
                    for s_ in range(num_topk):
                        pos = tl.load(row_meta + 2 + s_)
                        present = pos >= 0
                        v = tl.load(xb_ptr + tl.cast(pos, tl.int64) * hidden + offs,
                                    mask=offs < tl.where(present, hidden, 0), other=0.0).to(tl.float32)
                        acc = tl.where(present, tl.where(started, acc + v, v), acc)
                        started = started | present
                    tl.store((dst + offs * 2).to(tl.pointer_type(tl.bfloat16)), to_bf16(acc), mask=offs < hidden)
                if HAS_WEIGHTS:
                    pos_k = tl.load(row_meta + 2 + offs_k, mask=mk, other=-1)
                    w = tl.load(w_ptr + tl.where(pos_k >= 0, pos_k, 0), mask=mk & (pos_k >= 0), other=0.0)
                    tl.store((dst + off_w + offs_k * 4).to(tl.pointer_type(tl.float32)), w, mask=mk)
            else:
                copy_words(x_ptr + i64 * x_words, int32_ptr(dst), x_words, BLOCK)
                if HAS_WEIGHTS:
                    w = tl.load(w_ptr + i64 * num_topk + offs_k, mask=mk)
                    tl.store((dst + off_w + offs_k * 4).to(tl.pointer_type(tl.float32)), w, mask=mk)

    finish_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, ready_word + rank, seq, BLOCK_R)


@triton.jit(do_not_specialize=["num_tokens"])
def _combine_reduce_kernel(
    out_ptr, out_w_ptr, b0_ptr, b1_ptr, cslot_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, num_tokens, num_topk, hidden, T, slot_bytes, off_w, ready_word, freed_word,
    timeout_ns,
    NUM_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, PER_SLOT: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, ready_word, seq, timeout_ns, OP_COMBINE_RECV, seq,
                    BLOCK_R)
    n_eff = tl.where(ok, num_tokens, 0)
    base = tl.load(data_ptrs + rank)
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < num_topk
    for t in range(pid, n_eff, nprog):
        t64 = tl.cast(t, tl.int64)
        cs = tl.load(cslot_ptr + t64 * num_topk + offs_k, mask=mk, other=-1)
        # slots in reduction order: one per destination rank (j), or one per top-k slot (PER_SLOT)
        num_slots = num_topk if PER_SLOT else tl.max(cs) + 1
        for c in range(0, hidden, BLOCK_H):
            offs = c + tl.arange(0, BLOCK_H)
            m = offs < hidden
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            if NUM_BIAS > 0:
                acc = tl.load(b0_ptr + t64 * hidden + offs, mask=m, other=0.0).to(tl.float32)
                if NUM_BIAS > 1:
                    acc += tl.load(b1_ptr + t64 * hidden + offs, mask=m, other=0.0).to(tl.float32)
                started = offs >= 0
            else:
                # no bias: the first partial starts the sum, so a lone partial is copied bit for bit
                started = offs < 0
            for j in range(0, num_slots):
                if PER_SLOT:
                    present = tl.load(cslot_ptr + t64 * num_topk + j) >= 0
                else:
                    present = j < num_slots
                src = (base + (tl.cast(j, tl.int64) * T + t64) * slot_bytes + offs * 2).to(tl.pointer_type(tl.bfloat16))
                v = tl.load(src, mask=offs < tl.where(present, hidden, 0), other=0.0).to(tl.float32)
                acc = tl.where(present, tl.where(started, acc + v, v), acc)
                started = started | present
            tl.store(out_ptr + t64 * hidden + offs, to_bf16(acc), mask=m)
        if HAS_WEIGHTS:
            wsrc = base + (cs.to(tl.int64) * T + t64) * slot_bytes + off_w + offs_k * 4
            w = tl.load(wsrc.to(tl.pointer_type(tl.float32)), mask=mk & (cs >= 0), other=0.0)
            tl.store(out_w_ptr + t64 * num_topk + offs_k, w, mask=mk)

    end_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, freed_word + rank, seq, seq_ptr, BLOCK_R)




def push(*, x_words, topk_weights, recv_src_metadata, psum, data_ptrs, signal_ptrs, counter, status, rank,
         num_ranks, seq_ptr, T, slot_offsets, ready_word, freed_word, timeout_ns, num_programs, block_words,
         expand=False, per_slot=False):
    """Launch the push. Normal mode: row ``i`` of ``x`` is token ``i``'s partial. ``expand``: rows are
    expanded rows, reduced per token first (``topk_weights`` 1-D); ``per_slot``: expanded rows travel
    one per (token, slot) with no reduction (no weights)."""
    off_w, slot_bytes = slot_offsets
    k = recv_src_metadata.shape[1] - 2
    launch(_combine_push_kernel, num_programs,
        x_words, topk_weights if topk_weights is not None else status, recv_src_metadata, psum,
        data_ptrs, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, k, T, x_words.shape[1], slot_bytes,
        off_w, ready_word, freed_word, timeout_ns,
        HAS_WEIGHTS=topk_weights is not None, EXPAND=expand, PER_SLOT=per_slot, BLOCK=block_words,
        BLOCK_R=block_size(num_ranks), BLOCK_K=block_size(k),
    )


def reduce(*, out, out_weights, bias, combine_slot_idx, data_ptrs, signal_ptrs, counter, status, rank, num_ranks,
           seq_ptr, T, slot_offsets, ready_word, freed_word, timeout_ns, num_programs, block_h, per_slot=False):
    off_w, slot_bytes = slot_offsets
    n, k = combine_slot_idx.shape
    b0 = bias[0] if len(bias) > 0 else out
    b1 = bias[1] if len(bias) > 1 else out
    launch(_combine_reduce_kernel, num_programs,
        out, out_weights if out_weights is not None else status, b0, b1, combine_slot_idx,
        data_ptrs, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, n, k, out.shape[1], T, slot_bytes, off_w,
        ready_word, freed_word, timeout_ns,
        NUM_BIAS=len(bias), HAS_WEIGHTS=out_weights is not None, PER_SLOT=per_slot, BLOCK_H=block_h,
        BLOCK_R=block_size(num_ranks),
        BLOCK_K=block_size(k),
    )


__all__ = ["push", "reduce"]
