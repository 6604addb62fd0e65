"""Combine of plain rows (one partial row per received token) into combine slots: tiles of rows.

For a non-expanded handle when the dense combine (:mod:`.combine_dense`) does not run: a small
combine of two ranks, or a buffer whose flags were not sized (built without
``num_max_tokens_per_rank``). Expanded handles take :mod:`.combine_expand`. Two launches:

1. ``push``: waits until every peer has released its buffer (``freed == prev_seq``); received row
   ``i`` from a peer ``s`` (global source index ``g = s * T + t`` and combine slot ``j`` from
   ``recv_src_metadata[i, :2]``) goes to ``peer_s.data[(j * T + t) * slot_bytes]`` with its ``k``
   weights, as ``[BT, BW]`` tiles. Rows whose origin is this rank do not move: the reduction reads
   them where they are. The last program raises ``ready = seq``.
2. ``reduce``: waits for ``ready == seq``; for a block of ``BT`` tokens, adds in fp32 the bias and
   then partials ``j = 0, 1, ...`` (spec 3.4 order; ``ndist = max(combine_slot_idx[t]) + 1``),
   reading slot ``j`` from the receive area, or from this rank's own row of ``x`` at
   ``psum[rank - 1] + slot(t, rank)`` when ``j`` is this rank's slot; rounds once to bf16. Without
   bias the first partial starts the sum, so a lone partial is copied bit for bit. The last program
   raises ``freed = seq``.

Or both in one launch (:func:`pipelined`, whenever the flags fit): part of the programs push and
raise a flag per block of rows in the origin's signal area, the others reduce each tile of tokens
as soon as the flags of its rows are up (docs/design.md, "Combine").

Shapes: ``x`` ``[rows, H]`` bf16; ``topk_weights`` ``[rows, k]`` float32; ``recv_src_metadata``
``[rows, k + 2]`` int32; ``psum`` ``[R]`` int32 (valid rows = ``psum[-1]``); ``topk_idx``,
``dst_buffer_slot_idx``, ``combine_slot_idx`` ``[n, k]`` (the handle's); ``bias`` ``[n, H]`` bf16;
outputs ``[n, H]`` bf16 and ``[n, k]`` float32. Slot offsets: :func:`tritonep.sizing.combine_slot_offsets`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size
from .launch import launch
from ..recording import Offset
from .primitives import (OP_COMBINE_RECV, OP_COMBINE_SEND, device_fn, end_op, finish_op, finish_part, finish_pipelined,
                         int32_ptr, op_seq, poisoned, record_timeout, to_bf16, wait_peers, wait_words)
from .tiles import copy_tile_rows, routes, senders


def reduce_channels(num_ranks: int, num_topk: int) -> int:
    """Channels per reduction tile: 1024 with two partials per token, fewer with more, so that all
    partials of a tile fit in registers at once."""
    return max(256, 2048 // block_size(min(num_ranks, num_topk)))


@device_fn
def _push_rows(i, valid, x_ptr, w_ptr, meta_ptr, heap_ptr, data_ptrs, my_base, rank, num_topk, T, x_words,
               slot_words, off_w, HAS_WEIGHTS: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
    """Received rows ``i`` (``[BT]`` int32, where ``valid``) to their origins' combine slots, with
    their weights; rows whose origin is this rank stay (the reduction reads them in place)."""
    i64 = i.to(tl.int64)
    row_meta = meta_ptr + i64 * (num_topk + 2)
    g = tl.load(row_meta, mask=valid, other=0)
    j = tl.load(row_meta + 1, mask=valid, other=0)
    s = g // T
    t = g - s * T
    on = valid & (s != rank)
    peer = tl.load(data_ptrs + s, mask=on, other=0)
    # the origin's combine slot, as an offset from this rank's heap (both 16-byte aligned)
    slot_word = (peer - my_base) // 4 + (j.to(tl.int64) * T + t) * slot_words
    copy_tile_rows(x_ptr + i64 * x_words, heap_ptr + tl.multiple_of(slot_word, 4), on, x_words, BW, False)
    if HAS_WEIGHTS:
        offs_k = tl.arange(0, BK)
        m2 = tl.expand_dims(on, 1) & tl.expand_dims(offs_k < num_topk, 0)
        w = tl.load(w_ptr + tl.expand_dims(i64 * num_topk, 1) + tl.expand_dims(offs_k, 0), mask=m2)
        dst = tl.expand_dims(heap_ptr + tl.multiple_of(slot_word + off_w // 4, 4), 1) + tl.expand_dims(offs_k, 0)
        tl.store(dst.to(tl.pointer_type(tl.float32), bitcast=True), w, mask=m2)


@device_fn
def _sender_of(cs, j, dest, dslot, rank, T):
    """``([BT], [BT])``: for each token, the rank in its combine slot ``j`` and the slot that rank
    keeps its row in (this rank's receive slot numbering: ``dst_buffer_slot_idx - rank * T``)."""
    is_j = cs == j
    r_j = tl.max(tl.where(is_j, dest, -1), axis=1)
    slot_j = tl.max(tl.where(is_j & (dslot >= 0), dslot - rank * T, -1), axis=1)
    return r_j, slot_j


@device_fn
def _reduce_tile(blk, out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
                 heap_ptr, heap_w_ptr, local_base, rank, num_ranks, n, num_topk, num_experts, num_local_experts,
                 hidden, T, slot_bytes, off_w,
                 NUM_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, NJ: tl.constexpr, BT: tl.constexpr,
                 BH: tl.constexpr, BK: tl.constexpr, BY_RANK: tl.constexpr):
    """Output rows of tokens ``blk * BT ...``: bias, then every partial in slot order, in fp32.

    Where the peers' partials are: combine slot ``j`` of token ``t`` at ``(j * T + t) * slot_bytes``
    (weights at ``off_w`` in the slot), or with ``BY_RANK`` (the copy-engine combine) the row that
    rank ``r`` sent for its slot ``slot`` at element ``(r * T + slot) * hidden`` and its weights at
    float ``off_w + (r * T + slot) * num_topk``."""
    slot_elems = slot_bytes // 2
    offs_k = tl.arange(0, BK)
    mk = offs_k < num_topk
    offs_h = tl.arange(0, BH)
    t = blk * BT + tl.arange(0, BT)
    mt = t < n
    t64 = t.to(tl.int64)
    ids, valid, dest = routes(topk_ptr, t, mt, num_topk, num_experts, num_local_experts, num_ranks, BK)
    m2 = tl.expand_dims(mt, 1) & tl.expand_dims(mk, 0)
    tk = tl.expand_dims(t64 * num_topk, 1) + tl.expand_dims(offs_k, 0)
    cs = tl.load(cslot_ptr + tk, mask=m2, other=-1)
    dslot = tl.load(dst_slot_ptr + tk, mask=m2, other=-1)
    mine = dest == rank
    ndist = tl.max(cs, axis=1) + 1  # [BT] partials to add
    j_local = tl.max(tl.where(mine, cs, -1), axis=1)
    local_row = (local_base + tl.max(tl.where(mine & (dslot >= 0), dslot - rank * T, -1), axis=1)).to(tl.int64)
    for c in range(0, hidden, BH):
        cols = c + offs_h
        mh = tl.expand_dims(cols < hidden, 0)
        tile = tl.expand_dims(t64 * hidden, 1) + tl.expand_dims(cols, 0)
        if NUM_BIAS > 0:
            acc = tl.load(b0_ptr + tile, mask=tl.expand_dims(mt, 1) & mh, other=0.0).to(tl.float32)
            if NUM_BIAS > 1:
                acc += tl.load(b1_ptr + tile, mask=tl.expand_dims(mt, 1) & mh, other=0.0).to(tl.float32)
            started = tl.expand_dims(t >= 0, 1)
        else:
            acc = tl.zeros([BT, BH], dtype=tl.float32)
            started = tl.expand_dims(t < 0, 1)
        # unrolled over every possible slot (absent ones are masked, no memory traffic), so the
        # loads of all partials are in flight together instead of one latency after another
        for j in tl.static_range(NJ):
            present = tl.expand_dims(j < ndist, 1)
            # this rank's own partial is read where it is, the peers' from their combine slot
            # one base pointer and a selected offset (a select between two pointers loses their alignment)
            if BY_RANK:
                r_j, slot_j = _sender_of(cs, j, dest, dslot, rank, T)
                far = (r_j.to(tl.int64) * T + slot_j) * hidden
            else:
                far = (j * T + t64) * slot_elems
            off = tl.where(j == j_local, x_off + local_row * hidden, far)
            rows = heap_ptr + tl.multiple_of(off, 8)
            v = tl.load(tl.expand_dims(rows, 1) + tl.expand_dims(cols, 0), mask=present & mh, other=0.0)
            v = v.to(tl.float32)
            acc = tl.where(present, tl.where(started, acc + v, v), acc)
            started = started | present
        tl.store(out_ptr + tile, to_bf16(acc), mask=tl.expand_dims(mt, 1) & mh)
    if HAS_WEIGHTS == 2:
        # V1's combined_topk_weights: every destination's weight row summed (fp32, combine-slot order)
        kk = tl.expand_dims(offs_k, 0)
        w = tl.zeros([BT, BK], dtype=tl.float32)
        for j in tl.static_range(NJ):
            present = tl.expand_dims(j < ndist, 1)
            if BY_RANK:
                r_j, slot_j = _sender_of(cs, j, dest, dslot, rank, T)
                far_w = heap_w_ptr + off_w + tl.expand_dims((r_j.to(tl.int64) * T + slot_j) * num_topk, 1) + kk
            else:
                far_w = heap_w_ptr + tl.expand_dims((j * T + t64) * (slot_bytes // 4) + off_w // 4, 1) + kk
            wptrs = tl.where(j == tl.expand_dims(j_local, 1), w_ptr + tl.expand_dims(local_row * num_topk, 1) + kk,
                             far_w)
            w += tl.load(wptrs, mask=m2 & present, other=0.0)
        tl.store(out_w_ptr + tk, w, mask=m2)
    elif HAS_WEIGHTS:
        # combined_topk_weights[t, s]: the weight that came back in slot combine_slot_idx[t, s]
        from_x = cs == tl.expand_dims(j_local, 1)
        kk = tl.expand_dims(offs_k, 0)
        if BY_RANK:
            # each entry's rank sent the row at the slot of that rank's representative entry
            slot_e = cs * 0 - 1
            for j in tl.static_range(NJ):
                _, slot_j = _sender_of(cs, j, dest, dslot, rank, T)
                slot_e = tl.where(cs == j, tl.expand_dims(slot_j, 1), slot_e)
            far_w = heap_w_ptr + off_w + (dest.to(tl.int64) * T + slot_e) * num_topk + kk
        else:
            far_w = heap_w_ptr + (cs.to(tl.int64) * T + tl.expand_dims(t64, 1)) * (slot_bytes // 4) + off_w // 4 + kk
        wptrs = tl.where(from_x, w_ptr + tl.expand_dims(local_row * num_topk, 1) + kk, far_w)
        w = tl.load(wptrs, mask=m2 & (cs >= 0), other=0.0)
        tl.store(out_w_ptr + tk, w, mask=m2)


@device_fn
def _wait_rows(blk, n, topk_ptr, dst_slot_ptr, flags, block_rows, target, rank, num_ranks, num_topk, num_experts,
               num_local_experts, T, timeout_ns, skip, BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """Wait until every peer's rows for tokens ``blk * BT ...`` are here: the flag of each block of
    ``block_rows`` slots that holds them (``flags[s]``: the address of source ``s``'s first flag)
    equals ``target``. Slots at a peer follow token order, so a tile's slots there are consecutive
    and span at most two blocks (``BT <= block_rows``). Returns -1, or the first late source."""
    offs_r = tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    t = blk * BT + tl.arange(0, BT)
    mt = t < n
    _, _, dest = routes(topk_ptr, t, mt, num_topk, num_experts, num_local_experts, num_ranks, BK)
    m2 = tl.expand_dims(mt, 1) & tl.expand_dims(offs_k < num_topk, 0)
    tk = tl.expand_dims(t.to(tl.int64) * num_topk, 1) + tl.expand_dims(offs_k, 0)
    dslot = tl.load(dst_slot_ptr + tk, mask=m2, other=-1)
    at = tl.expand_dims(dest, 2) == tl.expand_dims(tl.expand_dims(offs_r, 0), 0)  # [BT, BK, BR]
    at = at & tl.expand_dims(dslot >= 0, 2)
    sl = tl.expand_dims(dslot - rank * T, 2)
    lo_slot = tl.min(tl.min(tl.where(at, sl, T), axis=0), axis=0)  # [BR]
    hi_slot = tl.max(tl.max(tl.where(at, sl, -1), axis=0), axis=0)
    need = (offs_r < num_ranks) & (offs_r != rank) & (hi_slot >= 0)  # (integer division truncates: test first)
    lo = tl.where(need, lo_slot, 0) // block_rows
    hi = tl.where(need, hi_slot, 0) // block_rows
    late = wait_words(int32_ptr(flags + lo.to(tl.int64) * 4), need, target, timeout_ns, skip)
    late2 = wait_words(int32_ptr(flags + hi.to(tl.int64) * 4), need & (hi != lo), target, timeout_ns,
                       skip | (late >= 0))
    return tl.where(late >= 0, late, late2)


@triton.jit
def _push_kernel(
    x_ptr, w_ptr, meta_ptr, psum_ptr, heap_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, num_topk, T, x_words, slot_bytes, off_w, ready_word, freed_word, timeout_ns,
    HAS_WEIGHTS: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, prev_seq = op_seq(seq_ptr)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns, OP_COMBINE_SEND,
                    seq, BR)
    offs_r = tl.arange(0, BR)
    psum = tl.load(psum_ptr + offs_r, mask=offs_r < num_ranks, other=0)
    n_rows = tl.where(ok, tl.max(psum), 0)
    my_base = tl.load(data_ptrs + rank)
    for b in range(pid, tl.cdiv(n_rows, BT), nprog):
        i = b * BT + tl.arange(0, BT)
        _push_rows(i, i < n_rows, x_ptr, w_ptr, meta_ptr, heap_ptr, data_ptrs, my_base, rank, num_topk, T, x_words,
                   slot_bytes // 4, off_w, HAS_WEIGHTS, BW, BK)

    finish_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, ready_word + rank, seq, BR)


@triton.jit(do_not_specialize=["n", "x_off"])
def _reduce_kernel(
    out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, psum_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
    heap_ptr, heap_w_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, n, num_topk, num_experts, num_local_experts, hidden, T, slot_bytes, off_w,
    ready_word, freed_word, timeout_ns,
    NUM_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, NJ: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, ready_word, seq, timeout_ns, OP_COMBINE_RECV, seq,
                    BR)
    n_eff = tl.where(ok, n, 0)
    local_base = tl.load(psum_ptr + rank - 1, mask=rank > 0, other=0)
    for blk in range(pid, tl.cdiv(n_eff, BT), nprog):
        _reduce_tile(blk, out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
                     heap_ptr, heap_w_ptr, local_base, rank, num_ranks, n, num_topk, num_experts, num_local_experts,
                     hidden, T, slot_bytes, off_w, NUM_BIAS, HAS_WEIGHTS, NJ, BT, BH, BK, False)

    end_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, freed_word + rank, seq, seq_ptr, BR)


@triton.jit(do_not_specialize=["n", "x_off"])
def _pipelined_kernel(
    x_ptr, w_ptr, meta_ptr, psum_ptr, heap_words_ptr,
    out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, topk_ptr, dst_slot_ptr, cslot_ptr, heap_ptr, heap_w_ptr,
    data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, n, num_topk, num_experts, num_local_experts, hidden, T, x_words, slot_bytes,
    off_w, flags_word, flag_blocks, ready_word, freed_word, timeout_ns, senders,
    NUM_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, NJ: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr,
    BTR: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, prev_seq = op_seq(seq_ptr)
    offs_r = tl.arange(0, BR)
    mr = offs_r < num_ranks
    psum = tl.load(psum_ptr + offs_r, mask=mr, other=0)
    start = tl.load(psum_ptr + offs_r - 1, mask=mr & (offs_r > 0), other=0)
    if pid < senders:
        ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns, OP_COMBINE_SEND,
                        seq, BR)
        count = psum - start
        nblocks = tl.where(mr & (offs_r != rank), tl.cdiv(count, BT), 0)
        peers = num_ranks - 1
        my_base = tl.load(data_ptrs + rank)
        # block-major over the peers (rank + 1, rank + 2, ...), so that every origin gets its first
        # tokens' rows early and its reduction can start
        for u in range(pid, tl.where(ok, tl.max(nblocks) * peers, 0), senders):
            b = u // peers
            s = (rank + 1 + u % peers) % num_ranks
            count_s = tl.sum(tl.where(offs_r == s, count, 0))
            if b * BT < count_s:
                lane = b * BT + tl.arange(0, BT)
                i = tl.sum(tl.where(offs_r == s, start, 0)) + lane
                _push_rows(i, lane < count_s, x_ptr, w_ptr, meta_ptr, heap_words_ptr, data_ptrs, my_base, rank,
                           num_topk, T, x_words, slot_bytes // 4, off_w, HAS_WEIGHTS, BW, BK)
                # every thread's rows of the block before its flag (release: see ``arrive``)
                tl.debug_barrier()
                flag = tl.load(signal_ptrs + s) + (flags_word + rank * flag_blocks + b).to(tl.int64) * 4
                tl.atomic_xchg(int32_ptr(flag), seq, sem="release", scope="sys")
        # the last sender: every row of this rank is out
        finish_part(counter_ptr + 1, senders, status_ptr, signal_ptrs, num_ranks, ready_word + rank, seq, BR)
    else:
        skip = poisoned(status_ptr)
        local_base = tl.load(psum_ptr + rank - 1, mask=rank > 0, other=0)
        flags = tl.load(signal_ptrs + rank) + (flags_word + offs_r * flag_blocks).to(tl.int64) * 4
        # (a buffer that stopped reads nothing: x may hold fewer rows than the counts, after an overflow)
        for blk in range(pid - senders, tl.where(skip, 0, tl.cdiv(n, BTR)), nprog - senders):
            late = _wait_rows(blk, n, topk_ptr, dst_slot_ptr, flags, BT, seq, rank, num_ranks, num_topk, num_experts,
                              num_local_experts, T, timeout_ns, skip, BTR, BR, BK)
            record_timeout(status_ptr, late, OP_COMBINE_RECV, seq)
            skip = skip | (late >= 0)
            _reduce_tile(blk, out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
                         heap_ptr, heap_w_ptr, local_base, rank, num_ranks, n, num_topk, num_experts,
                         num_local_experts, hidden, T, slot_bytes, off_w, NUM_BIAS, HAS_WEIGHTS, NJ, BTR, BH, BK, False)

    finish_pipelined(counter_ptr, status_ptr, signal_ptrs, rank, num_ranks, ready_word, freed_word, seq, seq_ptr,
                     timeout_ns, OP_COMBINE_RECV, 0, 0, BR)


def reduce_tile(tile, num_ranks: int, num_topk: int) -> tuple[int, int, int]:
    """``KernelConfig.combine_reduce_tile`` with 0 channels replaced by :func:`reduce_channels`."""
    bt, bh, warps = tile
    return bt, bh or reduce_channels(num_ranks, num_topk), warps


def _bias_pair(bias, out):
    """The kernels' two bias pointers (``out`` stands for a missing one; ``NUM_BIAS`` says how many)."""
    return (bias[0] if len(bias) > 0 else out), (bias[1] if len(bias) > 1 else out)


def weights_mode(out_weights, sum_weights: bool) -> int:
    """The reductions' ``HAS_WEIGHTS``: 0 no weights, 1 each slot's weight from the rank that owns
    its expert (V2), 2 every destination's row summed (V1's ``Buffer.combine``)."""
    return 0 if out_weights is None else (2 if sum_weights else 1)


def push(*, x_words, topk_weights, recv_src_metadata, psum, heap, data_ptrs, signal_ptrs, counter, status, rank,
         num_ranks, seq_ptr, T, slot_offsets, ready_word, freed_word, timeout_ns, num_programs, tile):
    """Launch the push in steps of ``tile`` (rows, 4-byte words, warps)."""
    off_w, slot_bytes = slot_offsets
    k = recv_src_metadata.shape[1] - 2
    bt, bw, warps = tile
    launch(_push_kernel, num_programs,
        x_words, topk_weights if topk_weights is not None else status, recv_src_metadata, psum,
        heap.view(torch.int32), data_ptrs,
        signal_ptrs, counter, status, rank, num_ranks, seq_ptr, k, T, x_words.shape[1], slot_bytes, off_w,
        ready_word, freed_word, timeout_ns,
        HAS_WEIGHTS=topk_weights is not None, BT=bt, BW=bw, BR=block_size(num_ranks), BK=block_size(k),
        num_warps=warps,
    )


def reduce(*, out, out_weights, bias, x, topk_weights, psum, topk_idx, dst_buffer_slot_idx, combine_slot_idx,
           num_experts, sum_weights=False, heap, data_ptrs, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, T, slot_offsets,
           ready_word, freed_word, timeout_ns, num_programs, tile):
    """Launch the reduction in steps of ``tile`` (:func:`reduce_tile`)."""
    off_w, slot_bytes = slot_offsets
    n, k = combine_slot_idx.shape
    b0, b1 = _bias_pair(bias, out)
    bt, bh, warps = reduce_tile(tile, num_ranks, k)
    launch(_reduce_kernel, num_programs,
        out, out_weights if out_weights is not None else status, b0, b1, Offset.between(x, heap, 2),
        topk_weights if topk_weights is not None else status, psum, topk_idx, dst_buffer_slot_idx, combine_slot_idx,
        heap.view(torch.bfloat16), heap.view(torch.float32), data_ptrs, signal_ptrs, counter, status,
        rank, num_ranks, seq_ptr, n, k, num_experts, num_experts // num_ranks, out.shape[1], T, slot_bytes, off_w,
        ready_word, freed_word, timeout_ns,
        NUM_BIAS=len(bias), HAS_WEIGHTS=weights_mode(out_weights, sum_weights), NJ=min(num_ranks, k), BT=bt, BH=bh,
        BR=block_size(num_ranks), BK=block_size(k), num_warps=warps,
    )


def pipelined(*, x_words, topk_weights, recv_src_metadata, psum, out, out_weights, bias, x, topk_idx,
              sum_weights=False, dst_buffer_slot_idx, combine_slot_idx, num_experts, heap, data_ptrs, signal_ptrs, counter, status, rank,
              num_ranks, seq_ptr, T, slot_offsets, flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
              num_programs, push_tile, reduce_tile_, sender_share):
    """Push and reduction in one launch of ``num_programs`` (>= 2): ``sender_share`` of them push
    steps of ``push_tile`` (rows, words, warps) received rows and raise one flag per step in the
    origin's signal area (``flags[sender][block] = seq``, ``flag_blocks`` words per sender,
    ``flag_blocks * rows >= T``); the others reduce steps of ``reduce_tile_`` tokens as soon as the
    flags of the blocks holding their rows are up. Outputs as :func:`reduce`."""
    off_w, slot_bytes = slot_offsets
    n, k = combine_slot_idx.shape
    br, bw, warps = push_tile
    btr, bh, _ = reduce_tile(reduce_tile_, num_ranks, k)
    assert num_programs >= 2 and flag_blocks * br >= T and btr <= br
    b0, b1 = _bias_pair(bias, out)
    launch(_pipelined_kernel, num_programs,
           x_words, topk_weights if topk_weights is not None else status, recv_src_metadata, psum, heap.view(torch.int32),
           out, out_weights if out_weights is not None else status, b0, b1, Offset.between(x, heap, 2),
           topk_idx, dst_buffer_slot_idx, combine_slot_idx, heap.view(torch.bfloat16), heap.view(torch.float32),
           data_ptrs, signal_ptrs, counter, status,
           rank, num_ranks, seq_ptr, n, k, num_experts, num_experts // num_ranks, out.shape[1], T,
           x_words.shape[1], slot_bytes, off_w, flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
           senders(num_programs, sender_share),
           NUM_BIAS=len(bias), HAS_WEIGHTS=weights_mode(out_weights, sum_weights), NJ=min(num_ranks, k), BT=br,
           BW=bw, BTR=btr, BH=bh, BR=block_size(num_ranks), BK=block_size(k), num_warps=warps)


__all__ = ["push", "reduce", "pipelined", "reduce_channels", "reduce_tile"]
