"""Dispatch of plain rows (bf16, or FP8 data + scales given by the caller): tiles of tokens.

The path of every dispatch that neither expands rows per expert nor casts to FP8 (those take
:mod:`tritonep.kernels.dispatch_expand`). Two launches, after the layout (:mod:`.layout`) has told
every rank how many rows it receives from whom, so outputs are allocated before any row moves:

1. ``push``: programs take steps of ``BT`` tokens; each tile of rows is loaded once (the next
   columns ahead of the stores) and stored to every rank it goes to, as ``[BT, BW]`` tiles of 4-byte
   words (16-byte vectors: every row starts 16-byte aligned). Rows for a peer land in its receive
   slot ``g = rank * T + slot``: the row at ``peer.data[g * row_pitch]``, its scales and metadata at
   ``peer.data[aux_base + g * aux_pitch]`` (so a source's rows are one dense block); rows this rank
   keeps go straight to the output at ``psum[rank - 1] + slot`` (no second copy). Cached dispatch
   first waits for ``freed == prev_seq`` (a fresh dispatch's layout kernel already did). The last
   program raises ``ready = seq``.
2. ``epilogue``: waits for ``ready == seq``; copies each peer's receive region (slots ``0..count``)
   to output rows ``psum[s - 1] + slot`` as tiles (or only scales and metadata, when the copy engine
   moves the row data, ``tritonep/copy_engine.py``); the last program raises ``freed = seq``.

Shapes: ``x`` ``[n, W]`` int32 words (W = row bytes / 4); ``sf`` ``[n, P]`` 4-byte packs, any
strides; ``topk_idx`` ``[n, k]`` int64; ``topk_weights`` ``[n, k]`` float32; ``dst_buffer_slot_idx``
and ``combine_slot_idx`` ``[n, k]`` int32; outputs ``recv_x`` ``[M, W]`` int32 view, ``recv_sf``
``[M, P]`` int32 view (any strides), ``recv_topk_idx`` ``[M, k]`` int64 (local expert or -1),
``recv_topk_weights`` ``[M, k]`` float32, ``recv_src_metadata`` ``[M, k + 2]`` int32 (columns 0-1).
Receive area: :func:`tritonep.sizing.dispatch_area`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size
from .launch import launch
from .layout import gather_counts, place
from .primitives import (OP_DISPATCH_RECV, OP_DISPATCH_SEND, device_fn, end_op, finish_op, op_seq, poisoned,
                         record_overflow, rows_verdict, wait_peers)
from .tiles import copy_tile_rows, routes

#: tokens per block of the layout kernels that a fresh push reads (its steps are a multiple)
BLOCK_TOKENS = 16
#: ``out_rows`` of outputs that hold every row (a launch argument that never changes, so that a
#: replayed launch stays right whatever the counts; only a capped dispatch passes its capacity)
ALL_ROWS = 2**31 - 1
#: the epilogue's tokens per step when the copy engine moves the row data (scales and metadata only:
#: few bytes per slot, so larger steps for fewer dependent rounds)
META_TOKENS = 64


@device_fn
def _copy_out(heap_ptr, s, slot, on, start, recv_x_ptr, recv_sf_ptr, recv_sf_stride_t, recv_sf_stride_p,
              recv_topk_ptr, recv_w_ptr, recv_meta_ptr, rank, num_topk, num_local_experts, T, x_words, num_sf,
              row_words, aux_word0, aux_words, off_sf, off_meta, HAS_SF: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
              BW: tl.constexpr, BK: tl.constexpr, BSF: tl.constexpr, COPY_X: tl.constexpr):
    """Received slots ``slot`` (``[BT]``, where ``on``) of source ``s`` from this rank's receive
    region to output rows ``start + slot``, with scales, local expert ids, weights and metadata
    (the row data only if ``COPY_X``: else the copy engine moves it, see ``copy_engine.py``)."""
    offs_k = tl.arange(0, BK)
    mk = offs_k < num_topk
    offs_sf = tl.arange(0, BSF)
    msf = offs_sf < num_sf
    on2 = tl.expand_dims(on, 1)
    row = (start + slot).to(tl.int64)
    g = (s * T + slot).to(tl.int64)
    aux_word = aux_word0 + g * aux_words
    if COPY_X:
        copy_tile_rows(heap_ptr + tl.multiple_of(g * row_words, 4), recv_x_ptr + tl.multiple_of(row * x_words, 4), on,
                       x_words, BW, False)
    if HAS_SF:
        sf = tl.load(tl.expand_dims(heap_ptr + tl.multiple_of(aux_word + off_sf // 4, 4), 1)
                     + tl.expand_dims(offs_sf, 0), mask=on2 & tl.expand_dims(msf, 0))
        tl.store(recv_sf_ptr + tl.expand_dims(row * recv_sf_stride_t, 1)
                 + tl.expand_dims(offs_sf * recv_sf_stride_p, 0), sf, mask=on2 & tl.expand_dims(msf, 0))
    meta = heap_ptr + tl.multiple_of(aux_word + off_meta // 4, 4)
    meta2 = tl.expand_dims(meta, 1) + tl.expand_dims(offs_k, 0)
    m2 = on2 & tl.expand_dims(mk, 0)
    ids = tl.load(meta2, mask=m2, other=-1)
    local = ids - rank * num_local_experts
    is_local = (ids >= 0) & (local >= 0) & (local < num_local_experts)
    rk = tl.expand_dims(row * num_topk, 1) + tl.expand_dims(offs_k, 0)
    tl.store(recv_topk_ptr + rk, tl.where(is_local, local, -1).to(tl.int64), mask=m2)
    if HAS_WEIGHTS:
        w = tl.load((meta2 + num_topk).to(tl.pointer_type(tl.float32), bitcast=True), mask=m2)
        tl.store(recv_w_ptr + rk, w, mask=m2)
    tl.store(recv_meta_ptr + row * (num_topk + 2), tl.load(meta + 2 * num_topk, mask=on), mask=on)
    tl.store(recv_meta_ptr + row * (num_topk + 2) + 1, tl.load(meta + 2 * num_topk + 1, mask=on), mask=on)


# Rows are addressed as ``base_ptr + tl.multiple_of(first_word, 4)``: the compiler knows a launch
# argument's alignment and keeps it through hinted integer offsets, so it emits 16-byte accesses (an
# address cast to a pointer loses that). The hint must sit in the kernel body: inside a helper it
# would land on a function argument and be dropped before inlining.


@triton.jit(do_not_specialize=["n"])
def _push_kernel(
    x_ptr, sf_ptr, sf_stride_t, sf_stride_p, topk_ptr, w_ptr, dst_slot_ptr, cslot_ptr, block_base_ptr, psum_ptr,
    recv_x_ptr, recv_sf_ptr, recv_sf_stride_t, recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr,
    heap_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, n, num_topk, num_experts, num_local_experts, T, out_rows,
    x_words, num_sf, row_words, aux_word0, aux_words, off_sf, off_meta, ready_word, freed_word, notified_word,
    counts_word, count_stride, timeout_ns, info_ptr, wait_ptr, alignment, cap, over_word, announced_word,
    WAIT_FREED: tl.constexpr, COUNTS_FROM_PEERS: tl.constexpr, PLACE: tl.constexpr, HAS_SF: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    BSF: tl.constexpr, CB: tl.constexpr, GATHER: tl.constexpr, CAPPED: tl.constexpr, BL: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, prev_seq = op_seq(seq_ptr)
    if WAIT_FREED:
        ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns, OP_DISPATCH_SEND,
                        seq, BR)
    else:
        ok = poisoned(status_ptr) == 0
    offs_r = tl.arange(0, BR)
    if COUNTS_FROM_PEERS:
        # this rank's own rows start after the rows of lower sources: read their announced counts
        # (the gather, at the end of program 0 or queued after this launch, makes psum for
        # everything else)
        ok = ok & wait_peers(signal_ptrs, status_ptr, rank, num_ranks, notified_word, seq, timeout_ns,
                             OP_DISPATCH_RECV, seq, BR)
        words = counts_word + offs_r * count_stride
        cnt = tl.load((tl.load(signal_ptrs + rank) + words.to(tl.int64) * 4).to(tl.pointer_type(tl.int32)),
                      mask=offs_r < rank, other=0, volatile=True)
        local_base = tl.sum(cnt)
    else:
        local_base = tl.load(psum_ptr + rank - 1, mask=rank > 0, other=0)
    n_eff = tl.where(ok, n, 0)
    offs_k = tl.arange(0, BK)
    mk = offs_k < num_topk
    offs_sf = tl.arange(0, BSF)
    msf = offs_sf < num_sf
    my_base = tl.load(data_ptrs + rank)
    # every rank's data area as an offset from this rank's, in words (16-byte aligned)
    peer_words = (tl.load(data_ptrs + offs_r, mask=offs_r < num_ranks, other=my_base) - my_base) // 4
    offs_w = tl.arange(0, BW)
    for b in range(pid, tl.cdiv(n_eff, BT), nprog):
        t = b * BT + tl.arange(0, BT)
        mt = t < n
        t64 = t.to(tl.int64)
        ids, valid, dest = routes(topk_ptr, t, mt, num_topk, num_experts, num_local_experts, num_ranks, BK)
        m2 = tl.expand_dims(mt, 1) & tl.expand_dims(mk, 0)
        tk = tl.expand_dims(t64 * num_topk, 1) + tl.expand_dims(offs_k, 0)
        if PLACE:
            # a fresh dispatch places its rows here (the layout kernel left each block's first slot
            # per rank) and writes the positions for the handle (the layout's blocks are CB tokens:
            # a step's first rows go where its first block's do, the rest follow in token order)
            base = tl.load(block_base_ptr + b * (BT // CB) * num_ranks + offs_r, mask=offs_r < num_ranks, other=0)
            _, dslot, cs = place(ids, valid, dest, base, rank, num_ranks, T, BK, BR)
            tl.store(dst_slot_ptr + tk, dslot, mask=m2)
            tl.store(cslot_ptr + tk, cs, mask=m2)
        else:
            dslot = tl.load(dst_slot_ptr + tk, mask=m2, other=-1)
            cs = tl.load(cslot_ptr + tk, mask=m2, other=-1)
        src_rows = x_ptr + t64 * x_words
        g = rank * T + t
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + tk, mask=m2, other=0.0)
        if HAS_SF:
            m_sf = tl.expand_dims(mt, 1) & tl.expand_dims(msf, 0)
            sf = tl.load(sf_ptr + tl.expand_dims(t64 * sf_stride_t, 1) + tl.expand_dims(offs_sf * sf_stride_p, 0),
                         mask=m_sf)
        # each row read once, then stored to every rank it goes to (a token of 2 ranks with top-8
        # routing goes to both), the next columns' loads in flight while these are stored
        at = (tl.expand_dims(dest, 2) == tl.expand_dims(tl.expand_dims(offs_r, 0), 0)) & tl.expand_dims(dslot >= 0, 2)
        slots = tl.max(tl.where(at, tl.expand_dims(dslot - rank * T, 2), -1), axis=1)  # [BT, BR]
        any_on = tl.max(slots, axis=1) >= 0
        own = tl.sum(tl.where(tl.expand_dims(offs_r, 0) == rank, slots, 0), axis=1)
        # (outputs of fewer rows than the worst case: rows past them are not written, and the
        # dispatch records the overflow, see primitives.rows_verdict)
        own = tl.where(local_base + own < out_rows, own, -1)
        own_rows = recv_x_ptr + tl.multiple_of((local_base + own).to(tl.int64) * x_words, 4)
        ahead = tl.load(tl.expand_dims(src_rows, 1) + tl.expand_dims(offs_w, 0),
                        mask=tl.expand_dims(any_on, 1) & tl.expand_dims(offs_w < x_words, 0))
        for c in range(0, x_words, BW):
            cols = c + offs_w
            mc = tl.expand_dims(cols < x_words, 0)
            v = ahead
            nxt = cols + BW
            ahead = tl.load(tl.expand_dims(src_rows, 1) + tl.expand_dims(nxt, 0),
                            mask=tl.expand_dims(any_on, 1) & tl.expand_dims(nxt < x_words, 0))
            tl.store(tl.expand_dims(own_rows, 1) + tl.expand_dims(cols, 0), v, mask=tl.expand_dims(own >= 0, 1) & mc)
            for d in range(num_ranks):
                if d != rank:
                    sel = tl.expand_dims(offs_r, 0) == d
                    sd = tl.sum(tl.where(sel, slots, 0), axis=1)
                    pw = tl.sum(tl.where(offs_r == d, peer_words, 0))
                    dst = heap_ptr + tl.multiple_of(pw + (rank * T + sd).to(tl.int64) * row_words, 4)
                    tl.store(tl.expand_dims(dst, 1) + tl.expand_dims(cols, 0), v, mask=tl.expand_dims(sd >= 0, 1) & mc)
        # then each destination's scales, expert ids, weights and metadata
        for d in range(num_ranks):
            to_d = dest == d
            slot = tl.max(tl.where(to_d & (dslot >= 0), dslot - rank * T, -1), axis=1)  # [BT]
            on = slot >= 0
            on2 = tl.expand_dims(on, 1)
            j = tl.max(tl.where(to_d, cs, -1), axis=1)
            if d == rank:
                # rows this rank keeps: straight into the outputs
                row = (local_base + slot).to(tl.int64)
                on = on & (row < out_rows)
                on2 = tl.expand_dims(on, 1)
                if HAS_SF:
                    tl.store(recv_sf_ptr + tl.expand_dims(row * recv_sf_stride_t, 1)
                             + tl.expand_dims(offs_sf * recv_sf_stride_p, 0), sf, mask=on2 & tl.expand_dims(msf, 0))
                local = ids - rank * num_local_experts
                is_local = valid & (local >= 0) & (local < num_local_experts)
                rk = tl.expand_dims(row * num_topk, 1) + tl.expand_dims(offs_k, 0)
                tl.store(recv_topk_ptr + rk, tl.where(is_local, local, -1), mask=on2 & tl.expand_dims(mk, 0))
                if HAS_WEIGHTS:
                    tl.store(recv_w_ptr + rk, w, mask=on2 & tl.expand_dims(mk, 0))
                tl.store(recv_meta_ptr + row * (num_topk + 2), g, mask=on)
                tl.store(recv_meta_ptr + row * (num_topk + 2) + 1, j, mask=on)
            else:
                # the peer's receive slot, as offsets from this rank's heap (all 16-byte aligned)
                peer_word = (tl.load(data_ptrs + d) - my_base) // 4
                g_d = (rank * T + slot).to(tl.int64)
                aux_word = peer_word + aux_word0 + g_d * aux_words
                if HAS_SF:
                    sf_rows = heap_ptr + tl.multiple_of(aux_word + off_sf // 4, 4)
                    tl.store(tl.expand_dims(sf_rows, 1) + tl.expand_dims(offs_sf, 0), sf,
                             mask=on2 & tl.expand_dims(msf, 0))
                meta = heap_ptr + tl.multiple_of(aux_word + off_meta // 4, 4)
                meta2 = tl.expand_dims(meta, 1) + tl.expand_dims(offs_k, 0)
                tl.store(meta2, ids.to(tl.int32), mask=on2 & tl.expand_dims(mk, 0))
                if HAS_WEIGHTS:
                    tl.store((meta2 + num_topk).to(tl.pointer_type(tl.float32), bitcast=True), w,
                             mask=on2 & tl.expand_dims(mk, 0))
                tl.store(meta + 2 * num_topk, g, mask=on)
                tl.store(meta + 2 * num_topk + 1, j, mask=on)

    if GATHER:
        if pid == 0:
            # the gather in this launch, one launch fewer (the peers' counts arrived: waited above)
            gather_counts(signal_ptrs, status_ptr, info_ptr, info_ptr, wait_ptr, rank, num_ranks, seq,
                          num_local_experts, counts_word, count_stride, notified_word, timeout_ns, alignment, cap,
                          over_word, announced_word, False, False, CAPPED, BR, BL)
    finish_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, ready_word + rank, seq, BR)


@triton.jit
def _epilogue_kernel(
    heap_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr, psum_ptr,
    recv_x_ptr, recv_sf_ptr, recv_sf_stride_t, recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr,
    rank, num_ranks, seq_ptr, num_topk, num_local_experts, T, out_rows, x_words, num_sf, row_words, aux_word0,
    aux_words, off_sf, off_meta, ready_word, freed_word, timeout_ns, over_word, announced_word,
    HAS_SF: tl.constexpr, HAS_WEIGHTS: tl.constexpr, COPY_X: tl.constexpr, CAPPED: tl.constexpr,
    BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BSF: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, ready_word, seq, timeout_ns, OP_DISPATCH_RECV, seq, BR)
    if CAPPED:  # every rank's verdict on its rows (the gather kernels announce them)
        ok = ok & wait_peers(signal_ptrs, status_ptr, rank, num_ranks, announced_word, seq, timeout_ns,
                             OP_DISPATCH_RECV, seq, BR)
        first, need = rows_verdict(signal_ptrs, rank, num_ranks, over_word, BR)
    start = 0
    for s in range(0, tl.where(ok, num_ranks, 0)):
        end = tl.load(psum_ptr + s)
        if s != rank:  # this rank's own rows went straight to the outputs
            for b in range(pid, tl.cdiv(end - start, BT), nprog):
                slot = b * BT + tl.arange(0, BT)
                _copy_out(heap_ptr, s, slot, (slot < end - start) & (start + slot < out_rows), start, recv_x_ptr, recv_sf_ptr, recv_sf_stride_t,
                          recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr, rank, num_topk,
                          num_local_experts, T, x_words, num_sf, row_words, aux_word0, aux_words, off_sf, off_meta,
                          HAS_SF, HAS_WEIGHTS, BW, BK, BSF, COPY_X)
        start = end

    if COPY_X:  # else the copy engine's row copies follow, then primitives.release ends the dispatch
        last = end_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, freed_word + rank, seq, seq_ptr, BR)
        if CAPPED:
            record_overflow(last, first, need, status_ptr, seq, BR)


def push(*, x_words, sf, topk_idx, topk_weights, dst_buffer_slot_idx, combine_slot_idx, block_base, psum, recv_x_words,
         recv_sf, recv_topk_idx, recv_topk_weights, recv_src_metadata, heap_words, data_ptrs, signal_ptrs, counter,
         status, rank, num_ranks, seq_ptr, num_experts, T, area, ready_word, freed_word, timeout_ns, num_programs,
         wait_freed, tile, counts_from_peers=False, notified_word=0, counts_word=0, count_stride=0, out_rows=None,
         gather_into=None):
    """Launch the push. ``psum``: ``[R]`` int32 inclusive prefix of rows per source (this rank's own
    rows start at ``psum[rank - 1]``), or None with ``counts_from_peers`` (read the peers' announced
    counts instead). ``block_base``: ``[cdiv(n, BLOCK_TOKENS), R]`` from the layout count kernel; the
    push then computes and writes ``dst_buffer_slot_idx``/``combine_slot_idx`` (else it reads them:
    cached dispatch). ``heap_words``: this rank's data area as int32 (peers' slots are addressed
    relative to it). ``wait_freed``: cached dispatch (no layout kernel waited). ``area``:
    :func:`tritonep.sizing.dispatch_area`. ``tile``: (tokens, 4-byte words, warps) per step; a fresh
    push's tokens are a multiple of ``BLOCK_TOKENS`` (``block_base`` is per ``BLOCK_TOKENS``).
    ``out_rows``: rows of the outputs when fewer than the worst case (rows past them are not written).
    ``gather_into`` (with ``counts_from_peers``): None, or the arguments of
    :func:`tritonep.kernels.layout.gather` that differ from this call's (``out``, ``wait_ns``,
    ``alignment``, ``cap``, ``over_word``, ``announced_word``; no host copy, no expand table):
    program 0 then gathers the counts, as a gather launched next would (one launch fewer)."""
    n, k = topk_idx.shape
    bt, bw, warps = tile
    if block_base is not None and bt % BLOCK_TOKENS:
        raise ValueError(f"push tile of {bt} tokens: a fresh push takes a multiple of {BLOCK_TOKENS} (the layout's "
                         "blocks)")
    row_pitch, aux_base, aux_pitch, off_sf, off_meta = area
    num_sf = sf.shape[1] if sf is not None else 0
    sf = sf.view(torch.int32) if sf is not None else None  # scale packs travel as opaque 4-byte words
    recv_sf = recv_sf.view(torch.int32) if recv_sf is not None else None
    dummy = status
    g = gather_into or {}
    if g and not counts_from_peers:
        raise ValueError("the push gathers only where it reads the peers' counts (counts_from_peers)")
    gcap = g.get("cap")
    launch(_push_kernel, num_programs,
        x_words, sf if sf is not None else dummy, sf.stride(0) if sf is not None else 0,
        sf.stride(1) if sf is not None else 0, topk_idx, topk_weights if topk_weights is not None else dummy,
        dst_buffer_slot_idx, combine_slot_idx, block_base if block_base is not None else dummy,
        psum if psum is not None else dummy,
        recv_x_words, recv_sf if recv_sf is not None else dummy,
        recv_sf.stride(0) if recv_sf is not None else 0, recv_sf.stride(1) if recv_sf is not None else 0,
        recv_topk_idx, recv_topk_weights if recv_topk_weights is not None else dummy, recv_src_metadata,
        heap_words, data_ptrs, signal_ptrs, counter, status,
        rank, num_ranks, seq_ptr, n, k, num_experts, num_experts // num_ranks, T,
        out_rows if out_rows is not None else ALL_ROWS, x_words.shape[1], num_sf, row_pitch // 4, aux_base // 4, aux_pitch // 4, off_sf, off_meta, ready_word,
        freed_word, notified_word, counts_word, count_stride, timeout_ns,
        g.get("out", dummy), g.get("wait_ns", dummy), g.get("alignment", 1), gcap if gcap is not None else 0,
        g.get("over_word", 0), g.get("announced_word", 0),
        WAIT_FREED=wait_freed, COUNTS_FROM_PEERS=counts_from_peers, PLACE=block_base is not None,
        HAS_SF=sf is not None, HAS_WEIGHTS=topk_weights is not None,
        BT=bt, BW=bw, BR=block_size(num_ranks), BK=block_size(k), BSF=block_size(num_sf), CB=BLOCK_TOKENS,
        GATHER=bool(g), CAPPED=gcap is not None, BL=block_size(num_experts // num_ranks), num_warps=warps,
    )


def epilogue(*, heap_words, data_ptrs, signal_ptrs, counter, status, psum, recv_x_words, recv_sf, recv_topk_idx,
             recv_topk_weights, recv_src_metadata, rank, num_ranks, seq_ptr, num_local_experts, T, area,
             ready_word, freed_word, timeout_ns, num_programs, tile, copy_x=True, out_rows=None, over_word=0,
             announced_word=0):
    """Launch the epilogue: the peers' rows from this rank's receive regions into the outputs, in
    steps of ``tile`` (tokens, 4-byte words, warps). ``copy_x=False``: everything but the row data
    (in steps of ``META_TOKENS``), and the dispatch does not end here: the caller copies the rows
    (copy engine), then raises ``freed`` (``primitives.release``). ``out_rows``: the outputs' rows
    when fewer than the worst case (else None): rows past them are never written; the epilogue waits
    for every rank's verdict on its rows and records an overflow (``primitives.rows_verdict``)."""
    assert copy_x or out_rows is None
    row_pitch, aux_base, aux_pitch, off_sf, off_meta = area
    k = recv_src_metadata.shape[1] - 2
    num_sf = recv_sf.shape[1] if recv_sf is not None else 0
    recv_sf = recv_sf.view(torch.int32) if recv_sf is not None else None
    dummy = status
    bt, bw, warps = tile
    launch(_epilogue_kernel, num_programs,
        heap_words, data_ptrs, signal_ptrs, counter, status, psum,
        recv_x_words, recv_sf if recv_sf is not None else dummy,
        recv_sf.stride(0) if recv_sf is not None else 0, recv_sf.stride(1) if recv_sf is not None else 0,
        recv_topk_idx, recv_topk_weights if recv_topk_weights is not None else dummy, recv_src_metadata,
        rank, num_ranks, seq_ptr, k, num_local_experts, T, out_rows if out_rows is not None else ALL_ROWS,
        recv_x_words.shape[1], num_sf,
        row_pitch // 4, aux_base // 4, aux_pitch // 4, off_sf, off_meta, ready_word, freed_word, timeout_ns,
        over_word, announced_word,
        HAS_SF=recv_sf is not None, HAS_WEIGHTS=recv_topk_weights is not None, COPY_X=copy_x, CAPPED=out_rows is not None,
        BT=bt if copy_x else META_TOKENS, BW=bw, BR=block_size(num_ranks), BK=block_size(k), BSF=block_size(num_sf),
        num_warps=warps,
    )


__all__ = ["push", "epilogue", "BLOCK_TOKENS"]
