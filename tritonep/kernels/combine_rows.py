"""Combine of plain rows (one partial row per received token): tiles of rows.

The fast path for every combine of a non-expanded handle (expanded ones use
:mod:`tritonep.kernels.combine`). Two launches:

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

Or both in one launch (:func:`pipelined`, the default): half the programs push and raise a flag
per block of rows in the origin's signal area, the other half reduce each tile of tokens as soon
as the flags of its rows are up (docs/design.md, "Combine").

Shapes: ``x`` ``[rows, H]`` bf16; ``topk_weights`` ``[rows, k]`` float32; ``recv_src_metadata``
``[rows, k + 2]`` int32; ``psum`` ``[R]`` int32 (valid rows = ``psum[-1]``); ``topk_idx``,
``dst_buffer_slot_idx``, ``combine_slot_idx`` ``[n, k]`` (the handle's); ``bias`` ``[n, H]`` bf16;
outputs ``[n, H]`` bf16 and ``[n, k]`` float32. Slot layout: :func:`tritonep.sizing.combine_slot_layout`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch_rows import copy_tile_rows, senders
from . import block_size
from .launch import launch
from .layout import routes
from .primitives import (OP_COMBINE_RECV, OP_COMBINE_SEND, device_fn, end_op, finish_op, finish_part, finish_pipelined,
                         int32_ptr, op_seq, poisoned, record_timeout, to_bf16, wait_peers, wait_words)

# tile shapes from benchmarks/tune_tiles.py on 2 x H200 (benchmarks/results/*_tune_tiles.txt)
BLOCK_ROWS = 32
BLOCK_WORDS = 256
#: tokens of one reduction tile; its channels: reduce_channels()
REDUCE_TOKENS = 16
NUM_WARPS = 8
#: share of a pipelined launch's programs that push (the rest reduce); not tuned yet
SENDER_SHARE = 0.5
#: (rows, 4-byte words) of an SM sender's step into the copy-engine layout (:func:`reduce_copied`
#: with ``send``), loading the next words ahead. On one H200 (``benchmarks/reduce_probe.py --send``,
#: 8192 tokens, 2 ranks, 12 of 24 programs sending beside 12 reducing) the launch took 488 us
#: against 519 for 32 x 256 without loading ahead (the setting until 2026-11-29), 64 x 256 767-894
#: (``results/2026-11-29_h200_combine_send_probe.log``)
SEND_TILE = (32, 512)


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
                is_j = cs == j
                r_j = tl.max(tl.where(is_j, dest, -1), axis=1)
                slot_j = tl.max(tl.where(is_j & (dslot >= 0), dslot - rank * T, -1), axis=1)
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
    if HAS_WEIGHTS:
        # combined_topk_weights[t, s]: the weight that came back in slot combine_slot_idx[t, s]
        from_x = cs == tl.expand_dims(j_local, 1)
        kk = tl.expand_dims(offs_k, 0)
        if BY_RANK:
            # each entry's rank sent the row at the slot of that rank's representative entry
            slot_e = cs * 0 - 1
            for j in tl.static_range(NJ):
                is_j = cs == j
                slot_j = tl.max(tl.where(is_j & (dslot >= 0), dslot - rank * T, -1), axis=1)
                slot_e = tl.where(is_j, tl.expand_dims(slot_j, 1), slot_e)
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
        for blk in range(pid - senders, tl.cdiv(n, BTR), nprog - senders):
            late = _wait_rows(blk, n, topk_ptr, dst_slot_ptr, flags, BT, seq, rank, num_ranks, num_topk, num_experts,
                              num_local_experts, T, timeout_ns, skip, BTR, BR, BK)
            record_timeout(status_ptr, late, OP_COMBINE_RECV, seq)
            skip = skip | (late >= 0)
            _reduce_tile(blk, out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
                         heap_ptr, heap_w_ptr, local_base, rank, num_ranks, n, num_topk, num_experts,
                         num_local_experts, hidden, T, slot_bytes, off_w, NUM_BIAS, HAS_WEIGHTS, NJ, BTR, BH, BK, False)

    finish_pipelined(counter_ptr, status_ptr, signal_ptrs, rank, num_ranks, ready_word, freed_word, seq, seq_ptr,
                     timeout_ns, OP_COMBINE_RECV, 0, 0, True, BR)


@device_fn
def _push_chunks(pid, nprog, x_ptr, w_ptr, psum_ptr, heap_ptr, data_ptrs, signal_ptrs, skip, rank, num_ranks, T,
                 x_words, num_topk, w_base, block_rows, flags_word, flag_blocks, HAS_WEIGHTS: tl.constexpr,
                 BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr):
    """The copies of the copy-engine combine done by programs ``pid, pid + nprog, ...``: rows
    received from each peer ``s`` to ``s``'s :func:`copied_layout`, one work item per block of
    ``block_rows`` rows and peer, each raising its block's flag in ``s``'s signal area. ``PREFETCH``:
    the next ``BW`` words of a step's rows are loaded before the current ones are stored."""
    offs_r = tl.arange(0, BR)
    mr = offs_r < num_ranks
    end = tl.load(psum_ptr + offs_r, mask=mr, other=0)
    start = tl.load(psum_ptr + offs_r - 1, mask=mr & (offs_r > 0), other=0)
    count = end - start
    chunks = tl.max(tl.where(mr & (offs_r != rank), tl.cdiv(count, block_rows), 0))
    my_base = tl.load(data_ptrs + rank)
    offs_k = tl.arange(0, BK)
    # block-major, so that every peer's first rows leave first and its reduction can start
    for u in range(pid, tl.where(skip, 0, chunks * num_ranks), nprog):
        c = u // num_ranks
        s = u % num_ranks
        count_s = tl.sum(tl.where(offs_r == s, count, 0))
        if (s != rank) & (c * block_rows < count_s):
            start_s = tl.sum(tl.where(offs_r == s, start, 0))
            peer = (tl.load(data_ptrs + s) - my_base) // 4  # the peer's data, in words from this rank's
            for r0 in range(c * block_rows, tl.minimum(count_s, (c + 1) * block_rows), BT):
                r = r0 + tl.arange(0, BT)
                on = r < tl.minimum(count_s, (c + 1) * block_rows)
                src = x_ptr + (start_s + r).to(tl.int64) * x_words
                dst = heap_ptr + tl.multiple_of(peer + (rank * T + r).to(tl.int64) * x_words, 4)
                copy_tile_rows(src, dst, on, x_words, BW, PREFETCH)
                if HAS_WEIGHTS:
                    m2 = tl.expand_dims(on, 1) & tl.expand_dims(offs_k < num_topk, 0)
                    w = tl.load(w_ptr + tl.expand_dims((start_s + r).to(tl.int64) * num_topk, 1)
                                + tl.expand_dims(offs_k, 0), mask=m2)
                    wdst = heap_ptr + peer + w_base + tl.expand_dims((rank * T + r).to(tl.int64) * num_topk, 1)
                    tl.store((wdst + tl.expand_dims(offs_k, 0)).to(tl.pointer_type(tl.float32), bitcast=True), w,
                             mask=m2)
            tl.debug_barrier()  # every thread's rows before the flag (release: see ``arrive``)
            flag = tl.load(signal_ptrs + s) + (flags_word + rank * flag_blocks + c).to(tl.int64) * 4
            tl.atomic_xchg(int32_ptr(flag), -1, sem="release", scope="sys")


@triton.jit(do_not_specialize=["n", "x_off"])
def _copied_reduce_kernel(
    out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, psum_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
    heap_ptr, heap_w_ptr, heap_words_ptr, x_words_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, n, num_topk, num_experts, num_local_experts, hidden, T, x_words, w_base, block_rows,
    flags_word, flag_blocks, ready_word, freed_word, timeout_ns, senders,
    NUM_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, NJ: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BTP: tl.constexpr, BW: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    skip = poisoned(status_ptr)
    local_base = tl.load(psum_ptr + rank - 1, mask=rank > 0, other=0)
    offs_r = tl.arange(0, BR)
    my_flags = tl.load(signal_ptrs + rank) + flags_word * 4
    flags = my_flags + (offs_r * flag_blocks).to(tl.int64) * 4
    if pid < senders:  # a rank without host counts sends with its first programs (queued after ``enter``)
        _push_chunks(pid, senders, x_words_ptr, w_ptr, psum_ptr, heap_words_ptr, data_ptrs, signal_ptrs, skip, rank,
                     num_ranks, T, x_words, num_topk, w_base, block_rows, flags_word, flag_blocks, HAS_WEIGHTS, BTP,
                     BW, BR, BK, PREFETCH)
    reducer = pid >= senders
    for blk in range(tl.where(reducer, pid - senders, 0), tl.where(reducer, tl.cdiv(n, BT), 0), nprog - senders):
        late = _wait_rows(blk, n, topk_ptr, dst_slot_ptr, flags, block_rows, -1, rank, num_ranks, num_topk,
                          num_experts, num_local_experts, T, timeout_ns, skip, BT, BR, BK)
        record_timeout(status_ptr, late, OP_COMBINE_RECV, seq)
        skip = skip | (late >= 0)
        _reduce_tile(blk, out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
                     heap_ptr, heap_w_ptr, local_base, rank, num_ranks, n, num_topk, num_experts, num_local_experts,
                     hidden, T, 0, w_base, NUM_BIAS, HAS_WEIGHTS, NJ, BT, BH, BK, True)

    # the chunk flags go back to zero before ``freed``: the peers set them to -1 again only after it
    finish_pipelined(counter_ptr, status_ptr, signal_ptrs, rank, num_ranks, ready_word, freed_word, seq, seq_ptr,
                     timeout_ns, OP_COMBINE_RECV, my_flags, num_ranks * flag_blocks, True, BR)




def push(*, x_words, topk_weights, recv_src_metadata, psum, heap, data_ptrs, signal_ptrs, counter, status, rank,
         num_ranks, seq_ptr, T, slot_layout, ready_word, freed_word, timeout_ns, num_programs):
    off_w, slot_bytes = slot_layout
    k = recv_src_metadata.shape[1] - 2
    launch(_push_kernel, num_programs,
        x_words, topk_weights if topk_weights is not None else status, recv_src_metadata, psum,
        heap.view(torch.int32), data_ptrs,
        signal_ptrs, counter, status, rank, num_ranks, seq_ptr, k, T, x_words.shape[1], slot_bytes, off_w,
        ready_word, freed_word, timeout_ns,
        HAS_WEIGHTS=topk_weights is not None, BT=BLOCK_ROWS, BW=BLOCK_WORDS, BR=block_size(num_ranks), BK=block_size(k),
        num_warps=NUM_WARPS,
    )


def reduce(*, out, out_weights, bias, x, topk_weights, psum, topk_idx, dst_buffer_slot_idx, combine_slot_idx,
           num_experts, heap, data_ptrs, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, T, slot_layout, ready_word,
           freed_word, timeout_ns, num_programs):
    off_w, slot_bytes = slot_layout
    n, k = combine_slot_idx.shape
    b0 = bias[0] if len(bias) > 0 else out
    b1 = bias[1] if len(bias) > 1 else out
    launch(_reduce_kernel, num_programs,
        out, out_weights if out_weights is not None else status, b0, b1, (x.data_ptr() - heap.data_ptr()) // 2,
        topk_weights if topk_weights is not None else status, psum, topk_idx, dst_buffer_slot_idx, combine_slot_idx,
        heap.view(torch.bfloat16), heap.view(torch.float32), data_ptrs, signal_ptrs, counter, status,
        rank, num_ranks, seq_ptr, n, k, num_experts, num_experts // num_ranks, out.shape[1], T, slot_bytes, off_w,
        ready_word, freed_word, timeout_ns,
        NUM_BIAS=len(bias), HAS_WEIGHTS=out_weights is not None, NJ=min(num_ranks, k), BT=REDUCE_TOKENS,
        BH=reduce_channels(num_ranks, k), BR=block_size(num_ranks), BK=block_size(k), num_warps=NUM_WARPS,
    )


def pipelined(*, x_words, topk_weights, recv_src_metadata, psum, out, out_weights, bias, x, topk_idx,
              dst_buffer_slot_idx, combine_slot_idx, num_experts, heap, data_ptrs, signal_ptrs, counter, status, rank,
              num_ranks, seq_ptr, T, slot_layout, flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
              num_programs):
    """Push and reduction in one launch of ``num_programs`` (>= 2): the first ``SENDER_SHARE`` push blocks of
    ``BLOCK_ROWS`` received rows and raise one flag per block in the origin's signal area
    (``flags[sender][block] = seq``, ``flag_blocks`` words per sender, ``flag_blocks * BLOCK_ROWS >=
    T``); the other half reduce tiles of tokens as soon as the flags of the blocks holding their
    rows are up. Outputs as :func:`reduce`."""
    off_w, slot_bytes = slot_layout
    n, k = combine_slot_idx.shape
    assert num_programs >= 2 and flag_blocks * BLOCK_ROWS >= T and REDUCE_TOKENS <= BLOCK_ROWS
    b0 = bias[0] if len(bias) > 0 else out
    b1 = bias[1] if len(bias) > 1 else out
    launch(_pipelined_kernel, num_programs,
           x_words, topk_weights if topk_weights is not None else status, recv_src_metadata, psum, heap.view(torch.int32),
           out, out_weights if out_weights is not None else status, b0, b1, (x.data_ptr() - heap.data_ptr()) // 2,
           topk_idx, dst_buffer_slot_idx, combine_slot_idx, heap.view(torch.bfloat16), heap.view(torch.float32),
           data_ptrs, signal_ptrs, counter, status,
           rank, num_ranks, seq_ptr, n, k, num_experts, num_experts // num_ranks, out.shape[1], T,
           x_words.shape[1], slot_bytes, off_w, flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
           senders(num_programs, SENDER_SHARE),
           NUM_BIAS=len(bias), HAS_WEIGHTS=out_weights is not None, NJ=min(num_ranks, k), BT=BLOCK_ROWS,
           BW=BLOCK_WORDS, BTR=REDUCE_TOKENS, BH=reduce_channels(num_ranks, k), BR=block_size(num_ranks), BK=block_size(k),
           num_warps=NUM_WARPS)


def copied_layout(num_ranks: int, T: int, hidden: int, num_topk: int) -> tuple[int, int]:
    """Receive area of the copy-engine combine: ``[R, T, hidden]`` bf16 rows (rank ``r``'s rows for
    this rank, in its slot order), then ``[R, T, k]`` float32 weights. Returns ``(weights byte
    offset, total bytes)``."""
    w_off = -(-num_ranks * T * hidden * 2 // 16) * 16
    return w_off, w_off + num_ranks * T * num_topk * 4


#: rows per flag of the copy-engine combine's layout (a tile of REDUCE_TOKENS tokens then waits for
#: at most two flags per peer; the SM sender has one work item per block and peer)
FLAG_ROWS = 64


def chunk_rows(T: int) -> int:
    """Rows per copy of the copy-engine combine (a multiple of :data:`FLAG_ROWS`; one flag copy
    raises all of its flags): about an eighth of the largest region (the reduction then trails the
    last copy by an eighth of its work), at least 256 rows (each copy has a fixed cost of a few
    microseconds)."""
    return max(256, -(-T // 8 // FLAG_ROWS) * FLAG_ROWS)


def chunk_bounds(count: int, chunk: int) -> list[tuple[int, int]]:
    """``(first row, rows)`` of each copy of a region of ``count`` rows: chunks of ``chunk`` rows (a
    multiple of :data:`FLAG_ROWS`, so that no flag block is shared by two copies). (Splitting the
    last chunk so that only 256 rows remain to reduce after it lands measured no faster on 2 x H200:
    8192 tokens, graphs, combine 401 us against 400, 2026-11-29.)"""
    return [(r0, min(chunk, count - r0)) for r0 in range(0, count, chunk)]


def copied_reduce_tile(num_ranks: int, num_topk: int) -> tuple[int, int, int]:
    """(tokens, channels, warps) of a step of the copy-engine combine's reduction: 64 tokens (one
    flag block) and a quarter of :func:`reduce_channels` (the same elements in flight), 16 warps.
    On one H200 (``benchmarks/reduce_probe.py``, 8192 tokens, hidden 7168, 2 ranks, 24 programs)
    that reduced in 257-267 us against 335-344 for 16 x 1024 x 8 (``results/2026-11-28_h200_
    reduce_tiles.log``). On 2 x H200, 8192 tokens, graphs: the combine 396 us (399 with the old
    tile: its copies bound it), the combine of a no-sync handle (half of the programs send) 545 us
    against 590 (``results/2026-11-28_h200x2_reduce_tile.log``)."""
    return FLAG_ROWS, max(64, reduce_channels(num_ranks, num_topk) // 4), 16


def reduce_copied(*, out, out_weights, bias, x, topk_weights, psum, topk_idx, dst_buffer_slot_idx, combine_slot_idx,
                  num_experts, heap, data_ptrs, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, T, flags_word,
                  flag_blocks, ready_word, freed_word, timeout_ns, num_programs, send: bool = False, tile=None,
                  send_tile=None, send_prefetch: bool = False):
    """The reduction of the copy-engine combine: every peer copies its rows for this rank to
    :func:`copied_layout` and raises ``flags[peer][c] = -1`` (signal word ``flags_word + peer *
    flag_blocks + c``) once rows ``c * FLAG_ROWS ...`` are there; tiles of tokens are reduced as
    soon as the flags of their rows are up (:func:`_wait_rows`), this rank's own partials read from
    ``x``. The last program zeroes the flags, waits for every peer's ``ready == seq`` (raised by
    :func:`tritonep.kernels.primitives.enter`) and raises ``freed = seq``. Outputs as :func:`reduce`.

    ``send``: this rank's host does not know the counts (a dispatch without CPU sync), so the first
    ``SENDER_SHARE`` of the programs send its rows instead of the copy engine (same rows, layout and
    flags; one work item per block of :data:`FLAG_ROWS` rows and peer) and the rest reduce, as in
    :func:`pipelined`. Queued after :func:`tritonep.kernels.primitives.enter`, which waited for the
    peers' ``freed``.

    ``tile``: (tokens, channels, warps) of a reduction step (tokens <= :data:`FLAG_ROWS`); default
    :func:`copied_reduce_tile`. ``send_tile``: (rows, 4-byte words) of a sender's step (default
    :data:`SEND_TILE`; the launch's warps are the reduction's); ``send_prefetch``: a sender loads
    each step's next words before it stores the current ones."""
    n, k = combine_slot_idx.shape
    H = out.shape[1]
    w_off, _ = copied_layout(num_ranks, T, H, k)
    bt, bh, warps = tile or copied_reduce_tile(num_ranks, k)
    assert bt <= FLAG_ROWS  # a tile's rows from one peer then span at most two flag blocks
    b0 = bias[0] if len(bias) > 0 else out
    b1 = bias[1] if len(bias) > 1 else out
    assert not send or num_programs >= 2
    btp, bw = send_tile or SEND_TILE
    launch(_copied_reduce_kernel, num_programs,
           out, out_weights if out_weights is not None else status, b0, b1, (x.data_ptr() - heap.data_ptr()) // 2,
           topk_weights if topk_weights is not None else status, psum, topk_idx, dst_buffer_slot_idx,
           combine_slot_idx, heap.view(torch.bfloat16), heap.view(torch.float32), heap.view(torch.int32),
           x.view(torch.int32), data_ptrs, signal_ptrs, counter, status,
           rank, num_ranks, seq_ptr, n, k, num_experts, num_experts // num_ranks, H, T, H // 2, w_off // 4, FLAG_ROWS,
           flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
           senders(num_programs, SENDER_SHARE) if send else 0,
           NUM_BIAS=len(bias), HAS_WEIGHTS=out_weights is not None, NJ=min(num_ranks, k), BT=bt, BH=bh,
           BR=block_size(num_ranks), BK=block_size(k), BTP=btp, BW=bw, PREFETCH=send and send_prefetch,
           num_warps=warps)


__all__ = ["push", "reduce", "pipelined", "reduce_copied", "copied_layout", "chunk_rows", "chunk_bounds", "copied_reduce_tile", "FLAG_ROWS"]
