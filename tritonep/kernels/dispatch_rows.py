"""Dispatch of plain rows (bf16, or FP8 data + scales given by the caller): tiles of tokens.

The fast path for every dispatch that neither expands rows per expert nor casts to FP8 (those use
:mod:`tritonep.kernels.dispatch`). Two launches, after the layout (:mod:`.layout`) has told every
rank how many rows it receives from whom, so outputs are allocated before any row moves:

1. ``push``: programs take blocks of ``BT`` tokens; for each destination rank ``d`` the block's
   rows that go there move as ``[BT, BW]`` tiles of 4-byte words (16-byte vectors: every row starts
   16-byte aligned). Rows for a peer land in its receive slot ``g = rank * T + slot``: the row at
   ``peer.data[g * row_pitch]``, its scales and metadata at ``peer.data[aux_base + g * aux_pitch]``
   (so a source's rows are one dense block); rows this rank keeps go straight to the output at
   ``psum[rank - 1] + slot`` (no second copy). Cached dispatch first waits for ``freed == prev_seq``
   (a fresh dispatch's layout kernel already did). The last program raises ``ready = seq``.
2. ``epilogue``: waits for ``ready == seq``; copies each peer's receive region (slots ``0..count``)
   to output rows ``psum[s - 1] + slot`` as tiles; the last program raises ``freed = seq``.

Or, for a cached dispatch whose rows the copy engine sends (off by default): :func:`gather` alone
(docs/design.md, "Copy-engine cached dispatch").

Shapes: ``x`` ``[n, W]`` int32 words (W = row bytes / 4); ``sf`` ``[n, P]`` 4-byte packs, any
strides; ``topk_idx`` ``[n, k]`` int64; ``topk_weights`` ``[n, k]`` float32; ``dst_buffer_slot_idx``
and ``combine_slot_idx`` ``[n, k]`` int32; outputs ``recv_x`` ``[M, W]`` int32 view, ``recv_sf``
``[M, P]`` int32 view (any strides), ``recv_topk_idx`` ``[M, k]`` int64 (local expert or -1),
``recv_topk_weights`` ``[M, k]`` float32, ``recv_src_metadata`` ``[M, k + 2]`` int32 (columns 0-1).
Receive layout: :func:`tritonep.sizing.dispatch_rows_layout`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size
from .launch import launch
from .layout import place, routes
from .primitives import (OP_DISPATCH_RECV, OP_DISPATCH_SEND, device_fn, end_op, fence_sys, finish_op, finish_part,
                         finish_pipelined, int32_ptr, op_seq, poisoned, record_timeout, wait_peers, wait_words)

#: tokens per tile and 4-byte words per tile column block (a 16 x 512 tile is 32 KiB in flight)
BLOCK_TOKENS = 16
BLOCK_WORDS = 512
NUM_WARPS = 8
#: the pipelined push's step, and every push's until 2026-11-29: tokens, words, warps
PIPELINED_PUSH_TILE = (BLOCK_TOKENS, BLOCK_WORDS, NUM_WARPS)
#: the push's default step: 32 tokens of 256 words, 8 warps. More rows in flight per program: on one
#: H200 (benchmarks/push_probe.py, 8192 tokens, 24 programs, fused and loading ahead) it took 183 us
#: against 234 for PIPELINED_PUSH_TILE unfused at 2 ranks, 372 against 507 at 8 (docs/benchmarks.md).
#: A fresh push's tokens are a multiple of BLOCK_TOKENS (:func:`push_tile`).
PUSH_TILE = (32, 256, 8)
#: share of a pipelined launch's programs that push (the rest copy out); not tuned yet
SENDER_SHARE = 0.5
#: the epilogue's tiles (a local copy: bytes in flight per SM bound it, not NVLink)
EPILOGUE_TOKENS = 16
EPILOGUE_WORDS = 512
EPILOGUE_WARPS = 8
#: the epilogue's tokens per tile when the copy engine moves the row data (scales and metadata only:
#: few bytes per slot, so larger tiles for fewer dependent rounds)
META_TOKENS = 64
#: rows per step of ``arrivals`` (one program writes a whole chunk's scales and metadata while the
#: push runs: many rows in flight per step, so that it keeps up with the push; not yet tuned)
ARRIVAL_TOKENS = 256
ARRIVAL_WARPS = 16


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
    rank, num_ranks, seq_ptr, n, num_topk, num_experts, num_local_experts, T,
    x_words, num_sf, row_words, aux_word0, aux_words, off_sf, off_meta, ready_word, freed_word, notified_word,
    counts_word, count_stride, slot_counts_word, slot_blocks, senders, timeout_ns,
    WAIT_FREED: tl.constexpr, COUNTS_FROM_PEERS: tl.constexpr, PLACE: tl.constexpr, HAS_SF: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, PIPELINED: tl.constexpr, COUNT: tl.constexpr, END_OP: tl.constexpr,
    FUSED: tl.constexpr, PREFETCH: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr,
    BK: tl.constexpr, BSF: tl.constexpr, CB: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, prev_seq = op_seq(seq_ptr)
    if pid < senders:  # every program unless PIPELINED
        if WAIT_FREED:
            ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns,
                            OP_DISPATCH_SEND, seq, BR)
        else:
            ok = poisoned(status_ptr) == 0
        offs_r = tl.arange(0, BR)
        if COUNTS_FROM_PEERS:
            # this rank's own rows start after the rows of lower sources: read their announced counts
            # (the gather kernel, queued after this one, makes psum for everything else)
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
        for b in range(pid, tl.cdiv(n_eff, BT), senders):
            t = b * BT + tl.arange(0, BT)
            mt = t < n
            t64 = t.to(tl.int64)
            ids, valid, dest = routes(topk_ptr, t, mt, num_topk, num_experts, num_local_experts, num_ranks, BK)
            m2 = tl.expand_dims(mt, 1) & tl.expand_dims(mk, 0)
            tk = tl.expand_dims(t64 * num_topk, 1) + tl.expand_dims(offs_k, 0)
            if PLACE:
                # a fresh dispatch places its rows here (the layout kernel left each block's first
                # slot per rank) and writes the positions for the handle
                # (the layout's blocks are CB tokens: a step's first rows go where its first block's do,
                # the rest follow in token order)
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
            if FUSED:
                # each row read once, then stored to every rank it goes to: a token of 2 ranks with
                # top-8 routing goes to both, and a program has one tile of loads in flight at a time
                at = (tl.expand_dims(dest, 2) == tl.expand_dims(tl.expand_dims(offs_r, 0), 0)) \
                    & tl.expand_dims(dslot >= 0, 2)
                slots = tl.max(tl.where(at, tl.expand_dims(dslot - rank * T, 2), -1), axis=1)  # [BT, BR]
                any_on = tl.max(slots, axis=1) >= 0
                own = tl.sum(tl.where(tl.expand_dims(offs_r, 0) == rank, slots, 0), axis=1)
                own_rows = recv_x_ptr + tl.multiple_of((local_base + own).to(tl.int64) * x_words, 4)
                if PREFETCH:  # the next columns' loads in flight while these are stored
                    ahead = tl.load(tl.expand_dims(src_rows, 1) + tl.expand_dims(offs_w, 0),
                                    mask=tl.expand_dims(any_on, 1) & tl.expand_dims(offs_w < x_words, 0))
                for c in range(0, x_words, BW):
                    cols = c + offs_w
                    mc = tl.expand_dims(cols < x_words, 0)
                    if PREFETCH:
                        v = ahead
                        nxt = cols + BW
                        ahead = tl.load(tl.expand_dims(src_rows, 1) + tl.expand_dims(nxt, 0),
                                        mask=tl.expand_dims(any_on, 1) & tl.expand_dims(nxt < x_words, 0))
                    else:
                        v = tl.load(tl.expand_dims(src_rows, 1) + tl.expand_dims(cols, 0),
                                    mask=tl.expand_dims(any_on, 1) & mc)
                    tl.store(tl.expand_dims(own_rows, 1) + tl.expand_dims(cols, 0), v,
                             mask=tl.expand_dims(own >= 0, 1) & mc)
                    for d in range(num_ranks):
                        if d != rank:
                            sel = tl.expand_dims(offs_r, 0) == d
                            sd = tl.sum(tl.where(sel, slots, 0), axis=1)
                            pw = tl.sum(tl.where(offs_r == d, peer_words, 0))
                            dst = heap_ptr + tl.multiple_of(pw + (rank * T + sd).to(tl.int64) * row_words, 4)
                            tl.store(tl.expand_dims(dst, 1) + tl.expand_dims(cols, 0), v,
                                     mask=tl.expand_dims(sd >= 0, 1) & mc)
            for d in range(num_ranks):
                to_d = dest == d
                slot = tl.max(tl.where(to_d & (dslot >= 0), dslot - rank * T, -1), axis=1)  # [BT]
                on = slot >= 0
                j = tl.max(tl.where(to_d, cs, -1), axis=1)
                if d == rank:
                    # rows this rank keeps: straight into the outputs
                    row = (local_base + slot).to(tl.int64)
                    if not FUSED:
                        copy_tile_rows(src_rows, recv_x_ptr + tl.multiple_of(row * x_words, 4), on, x_words, BW,
                                       PREFETCH)
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
                    if not FUSED:
                        copy_tile_rows(src_rows, heap_ptr + tl.multiple_of(peer_word + g_d * row_words, 4), on,
                                       x_words, BW, PREFETCH)
                    on2 = tl.expand_dims(on, 1)
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
            if COUNT:
                # count the block's rows into each receiver's per-CB-slot counters (its slots there are
                # consecutive: lo .. hi - 1) once every thread's stores to all of them are issued: one
                # CTA barrier and one fence per block, then relaxed atomics (a release atomic per
                # counter made the counting push at 8 ranks ~40 % slower than the plain one)
                tl.debug_barrier()
                fence_sys()
                for d in range(num_ranks):
                    if d != rank:
                        slot = tl.max(tl.where((dest == d) & (dslot >= 0), dslot - rank * T, -1), axis=1)
                        on = slot >= 0
                        n_on = tl.sum(on.to(tl.int32))
                        if n_on > 0:
                            lo = tl.min(tl.where(on, slot, 2**30))
                            hi = lo + n_on
                            ctrs = tl.load(signal_ptrs + d) + (slot_counts_word + rank * slot_blocks).to(tl.int64) * 4
                            for cb in range(lo // CB, (hi - 1) // CB + 1):
                                part = tl.minimum(hi, (cb + 1) * CB) - tl.maximum(lo, cb * CB)
                                tl.atomic_add(int32_ptr(ctrs + cb * 4), part, sem="relaxed", scope="sys")
        if PIPELINED:
            # the last sender: every row of this rank is out
            finish_part(counter_ptr + 1, senders, status_ptr, signal_ptrs, num_ranks, ready_word + rank, seq, BR)
    elif PIPELINED:
        # receivers: copy each block of 16 slots of a peer's region out once its counter shows
        # all of its rows, block-major over the peers (rank + 1, rank + 2, ...)
        skip = poisoned(status_ptr)
        offs_r = tl.arange(0, BR)
        mr = offs_r < num_ranks
        if COUNTS_FROM_PEERS:
            ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, notified_word, seq, timeout_ns,
                            OP_DISPATCH_RECV, seq, BR)
            skip = skip | (ok == 0)
            words = counts_word + offs_r * count_stride
            count = tl.load(int32_ptr(tl.load(signal_ptrs + rank) + words.to(tl.int64) * 4), mask=mr, other=0,
                            volatile=True)
            start = tl.cumsum(count, 0) - count
        else:
            end = tl.load(psum_ptr + offs_r, mask=mr, other=0)
            start = tl.load(psum_ptr + offs_r - 1, mask=mr & (offs_r > 0), other=0)
            count = end - start
        nblocks = tl.where(mr & (offs_r != rank), tl.cdiv(count, BT), 0)
        peers = num_ranks - 1
        counters = tl.load(signal_ptrs + rank) + slot_counts_word.to(tl.int64) * 4
        lanes = tl.arange(0, 2)
        for u in range(pid - senders, tl.where(skip, 0, tl.max(nblocks) * peers), nprog - senders):
            c = u // peers
            s = (rank + 1 + u % peers) % num_ranks
            count_s = tl.sum(tl.where(offs_r == s, count, 0))
            if c * BT < count_s:
                ctr = counters + (s * slot_blocks + c).to(tl.int64) * 4
                late = wait_words(int32_ptr(ctr + lanes.to(tl.int64) * 0), lanes == 0,
                                  tl.minimum(count_s - c * BT, BT), timeout_ns, skip)
                record_timeout(status_ptr, tl.where(late >= 0, s, -1), OP_DISPATCH_RECV, seq)
                skip = skip | (late >= 0)
                slot = c * BT + tl.arange(0, BT)
                _copy_out(heap_ptr, s, slot, slot < count_s, tl.sum(tl.where(offs_r == s, start, 0)), recv_x_ptr,
                          recv_sf_ptr, recv_sf_stride_t, recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr,
                          rank, num_topk, num_local_experts, T, x_words, num_sf, row_words, aux_word0, aux_words,
                          off_sf, off_meta, HAS_SF, HAS_WEIGHTS, BW, BK, BSF, True)
                # zero for the next dispatch (whose senders wait until this one raised freed)
                tl.atomic_xchg(int32_ptr(ctr), 0, sem="relaxed", scope="sys")

    if PIPELINED:
        finish_pipelined(counter_ptr, status_ptr, signal_ptrs, rank, num_ranks, ready_word, freed_word, seq, seq_ptr,
                         timeout_ns, OP_DISPATCH_RECV, 0, 0, END_OP, BR)
    else:
        finish_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, ready_word + rank, seq, BR)


@triton.jit
def _epilogue_kernel(
    heap_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr, psum_ptr,
    recv_x_ptr, recv_sf_ptr, recv_sf_stride_t, recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr,
    rank, num_ranks, seq_ptr, num_topk, num_local_experts, T, x_words, num_sf, row_words, aux_word0, aux_words, off_sf,
    off_meta, ready_word, freed_word, slot_counts_word, slot_blocks, timeout_ns,
    HAS_SF: tl.constexpr, HAS_WEIGHTS: tl.constexpr, COPY_X: tl.constexpr, ZERO_COUNTS: tl.constexpr,
    BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BSF: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, ready_word, seq, timeout_ns, OP_DISPATCH_RECV, seq, BR)
    start = 0
    for s in range(0, tl.where(ok, num_ranks, 0)):
        end = tl.load(psum_ptr + s)
        if s != rank:  # this rank's own rows went straight to the outputs
            for b in range(pid, tl.cdiv(end - start, BT), nprog):
                slot = b * BT + tl.arange(0, BT)
                _copy_out(heap_ptr, s, slot, slot < end - start, start, recv_x_ptr, recv_sf_ptr, recv_sf_stride_t,
                          recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr, rank, num_topk,
                          num_local_experts, T, x_words, num_sf, row_words, aux_word0, aux_words, off_sf, off_meta,
                          HAS_SF, HAS_WEIGHTS, BW, BK, BSF, COPY_X)
            if ZERO_COUNTS:
                # the senders counted their rows for an overlapped copy-out that this rank does not
                # run (its host has no counts): zero the counters for the next dispatch (every
                # sender's adds came before its ``ready``)
                counters = tl.load(signal_ptrs + rank) + (slot_counts_word + s * slot_blocks).to(tl.int64) * 4
                nb = tl.cdiv(end - start, 16)  # the push's BLOCK_TOKENS slots per counter
                for c0 in range(pid * 1024, nb, nprog * 1024):
                    cb = c0 + tl.arange(0, 1024)
                    tl.store(int32_ptr(counters + cb.to(tl.int64) * 4), 0, mask=cb < nb)
        start = end

    if COPY_X:  # else the copy engine's row copies follow, then primitives.release ends the dispatch
        end_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, freed_word + rank, seq, seq_ptr, BR)


@triton.jit(do_not_specialize=["s", "first", "rows"])
def _arrivals_kernel(
    heap_ptr, signal_ptrs, status_ptr, psum_ptr, recv_sf_ptr, recv_sf_stride_t, recv_sf_stride_p, recv_topk_ptr,
    recv_w_ptr, recv_meta_ptr, rank, s, first, rows, seq_ptr, num_topk, num_local_experts, T, num_sf, row_words,
    aux_word0, aux_words, off_sf, off_meta, slot_counts_word, slot_blocks, timeout_ns,
    HAS_SF: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr,
    BK: tl.constexpr, BSF: tl.constexpr,
):
    seq, _ = op_seq(seq_ptr)
    skip = poisoned(status_ptr)
    end = first + rows
    counters = tl.load(signal_ptrs + rank) + (slot_counts_word + s * slot_blocks).to(tl.int64) * 4
    # the senders count each block of BT slots into its counter once its rows are stored; a chunk
    # ends on a block boundary or at the region's end, so its last block expects the rest
    for b0 in range(first // BT, tl.cdiv(end, BT), BC):
        b = b0 + tl.arange(0, BC)
        m = b < tl.cdiv(end, BT)
        ptrs = int32_ptr(counters + b.to(tl.int64) * 4)
        late = wait_words(ptrs, m, tl.minimum(end - b * BT, BT), timeout_ns, skip)
        record_timeout(status_ptr, tl.where(late >= 0, s, -1), OP_DISPATCH_RECV, seq)
        skip = skip | (late >= 0)
        # zero for the next dispatch, whose senders wait until this one raised ``freed``
        tl.store(ptrs, 0, mask=m)
    start = tl.load(psum_ptr + s - 1, mask=s > 0, other=0)
    for i0 in range(first, tl.where(skip, first, end), BM):
        slot = i0 + tl.arange(0, BM)
        _copy_out(heap_ptr, s, slot, slot < end, start, recv_meta_ptr, recv_sf_ptr, recv_sf_stride_t,
                  recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, recv_meta_ptr, rank, num_topk, num_local_experts, T,
                  0, num_sf, row_words, aux_word0, aux_words, off_sf, off_meta, HAS_SF, HAS_WEIGHTS, 16, BK, BSF,
                  False)


@triton.jit(do_not_specialize=["num_recv", "x_off", "sf_off", "topk_off", "w_off"])
def _gather_kernel(
    heap_ptr, heap_i64_ptr, x_off, sf_off, topk_off, w_off, recv_x_ptr, recv_sf_ptr, recv_sf_stride_t,
    recv_sf_stride_p, recv_topk_ptr, recv_w_ptr, meta_ptr, psum_ptr, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, num_recv, num_topk, num_local_experts, T, x_words, num_sf, sf_word0, topk_word0,
    w_word0, flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
    HAS_SF: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr,
    BK: tl.constexpr, BSF: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    skip = poisoned(status_ptr)
    offs_r = tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    offs_sf = tl.arange(0, BSF)
    my_flags = tl.load(signal_ptrs + rank) + flags_word * 4
    # rows past the received count (worst-case outputs of a dispatch without CPU sync) stay as they are
    num_recv = tl.minimum(num_recv, tl.load(psum_ptr + num_ranks - 1))
    for blk in range(pid, tl.cdiv(num_recv, BT), nprog):
        i = blk * BT + tl.arange(0, BT)
        on = i < num_recv
        g = tl.load(meta_ptr + i.to(tl.int64) * (num_topk + 2), mask=on, other=0).to(tl.int64)
        s = g // T
        t = g - s * T
        mine = s == rank
        # a peer's chunks land in token order on one stream, each then raising its flags: the flag
        # of the block holding the tile's last token from that peer covers every earlier row too
        at = tl.expand_dims(on & ~mine, 1) & (tl.expand_dims(s, 1) == tl.expand_dims(offs_r, 0))
        hi = tl.max(tl.where(at, tl.expand_dims(t, 1), -1), axis=0)  # [BR]
        need = hi >= 0
        flag = my_flags + (offs_r * flag_blocks + tl.where(need, hi, 0) // 64).to(tl.int64) * 4
        late = wait_words(int32_ptr(flag), need, -1, timeout_ns, skip)
        record_timeout(status_ptr, late, OP_DISPATCH_RECV, seq)
        skip = skip | (late >= 0)
        # this rank's own tokens are read where the caller has them (offsets from the heap's base)
        row = tl.where(mine, x_off + t * x_words, g * x_words)
        copy_tile_rows(heap_ptr + tl.multiple_of(row, 4), recv_x_ptr + tl.multiple_of(i.to(tl.int64) * x_words, 4),
                       on, x_words, BW, False)
        on2 = tl.expand_dims(on, 1)
        if HAS_SF:
            m = on2 & tl.expand_dims(offs_sf < num_sf, 0)
            src = tl.where(mine, sf_off + t * num_sf, sf_word0 + g * num_sf)
            v = tl.load(heap_ptr + tl.expand_dims(src, 1) + tl.expand_dims(offs_sf, 0), mask=m)
            tl.store(recv_sf_ptr + tl.expand_dims(i.to(tl.int64) * recv_sf_stride_t, 1)
                     + tl.expand_dims(offs_sf * recv_sf_stride_p, 0), v, mask=m)
        m2 = on2 & tl.expand_dims(offs_k < num_topk, 0)
        ik = tl.expand_dims(i.to(tl.int64) * num_topk, 1) + tl.expand_dims(offs_k, 0)
        src_k = tl.expand_dims(tl.where(mine, topk_off + t * num_topk, topk_word0 + g * num_topk), 1)
        ids = tl.load(heap_i64_ptr + src_k + tl.expand_dims(offs_k, 0), mask=m2, other=-1)
        local = ids - rank * num_local_experts
        is_local = (ids >= 0) & (local >= 0) & (local < num_local_experts)
        tl.store(recv_topk_ptr + ik, tl.where(is_local, local, -1), mask=m2)
        if HAS_WEIGHTS:
            src_w = tl.expand_dims(tl.where(mine, w_off + t * num_topk, w_word0 + g * num_topk), 1)
            w = tl.load((heap_ptr + src_w + tl.expand_dims(offs_k, 0)).to(tl.pointer_type(tl.float32), bitcast=True),
                        mask=m2)
            tl.store(recv_w_ptr + ik, w, mask=m2)

    # the flags go back to zero before ``freed``: the peers set them again only after it
    finish_pipelined(counter_ptr, status_ptr, signal_ptrs, rank, num_ranks, ready_word, freed_word, seq, seq_ptr,
                     timeout_ns, OP_DISPATCH_RECV, my_flags, num_ranks * flag_blocks, True, BR)


def senders(num_programs: int, share: float) -> int:
    """Programs of a pipelined launch that push: ``share`` of them, at least one, leaving one."""
    return max(1, min(num_programs - 1, round(num_programs * share)))




def push_tile(tile, pipelined: bool, fresh: bool) -> tuple[int, int, int]:
    """``tile`` (tokens, words, warps; None: ``PUSH_TILE``, or ``PIPELINED_PUSH_TILE`` for a pipelined
    push) as a push can take it: a pipelined push's receivers copy out per ``BLOCK_TOKENS`` slots, a
    fresh push reads the layout's blocks of ``BLOCK_TOKENS`` (tokens rounded up to a multiple)."""
    bt, bw, warps = tile or (PIPELINED_PUSH_TILE if pipelined else PUSH_TILE)
    if pipelined:
        bt = BLOCK_TOKENS
    elif fresh:
        bt = -(-bt // BLOCK_TOKENS) * BLOCK_TOKENS
    return bt, bw, warps


def push(*, x_words, sf, topk_idx, topk_weights, dst_buffer_slot_idx, combine_slot_idx, block_base, psum, recv_x_words,
         recv_sf, recv_topk_idx, recv_topk_weights, recv_src_metadata, heap_words, data_ptrs, signal_ptrs, counter,
         status, rank, num_ranks, seq_ptr, num_experts, T, slot_layout, ready_word, freed_word, timeout_ns,
         num_programs, wait_freed, counts_from_peers=False, notified_word=0, counts_word=0, count_stride=0,
         slot_counts_word=0, slot_blocks=0, pipelined=False, end_op=True, count_arrivals=False, fused=False,
         tile=None, prefetch=False):
    """Launch the push. ``psum``: ``[R]`` int32 inclusive prefix of rows per source (this rank's own
    rows start at ``psum[rank - 1]``), or None with ``counts_from_peers`` (read the peers' announced
    counts instead). ``block_base``: ``[cdiv(n, BLOCK_TOKENS), R]`` from the layout count kernel; the
    push then computes and writes ``dst_buffer_slot_idx``/``combine_slot_idx`` (else it reads them:
    cached dispatch). ``heap_words``: this rank's data area as int32 (peers' slots are addressed
    relative to it). ``wait_freed``: cached dispatch (no layout kernel waited).

    ``pipelined`` (``num_programs >= 2``): the epilogue's work in the same launch. The first
    ``SENDER_SHARE`` of the programs push and count each block's rows into the receiver's counters (signal word
    ``slot_counts_word + source * slot_blocks + slot // BLOCK_TOKENS``, zero between operations,
    ``slot_blocks * BLOCK_TOKENS >= T``); the other half copy each block of slots out as soon as its
    counter is full. No :func:`epilogue` follows; ``end_op``: neither does any other launch of the
    dispatch (false when the gather kernel is queued after the push: it ends the operation then).
    ``count_arrivals``: every program pushes and counts rows into those counters, for
    :func:`arrivals` on the receivers (no copy-out in this launch). ``fused``: each tile of rows is
    loaded once and stored to every rank it goes to (else once per destination). ``tile``: (tokens,
    4-byte words, warps) per step, default as :func:`push_tile` gives it; a pipelined
    push's tokens are ``BLOCK_TOKENS`` (its receivers copy out per counter), a fresh push's a multiple of
    it (``block_base`` is per ``BLOCK_TOKENS``). ``prefetch``: each step's next columns are loaded
    before its current ones are stored (two steps of loads in flight per program)."""
    n, k = topk_idx.shape
    bt, bw, warps = tile or push_tile(None, pipelined, fresh=block_base is not None)
    if (pipelined and bt != BLOCK_TOKENS) or (block_base is not None and bt % BLOCK_TOKENS):
        raise ValueError(f"push tile of {bt} tokens: a pipelined push takes {BLOCK_TOKENS}, a fresh one a multiple "
                         f"of {BLOCK_TOKENS} (the layout's blocks)")
    row_pitch, aux_base, aux_pitch, off_sf, off_meta = slot_layout
    num_sf = sf.shape[1] if sf is not None else 0
    sf = sf.view(torch.int32) if sf is not None else None  # scale packs travel as opaque 4-byte words
    recv_sf = recv_sf.view(torch.int32) if recv_sf is not None else None
    if pipelined:
        assert num_programs >= 2
    if pipelined or count_arrivals:
        assert slot_blocks * BLOCK_TOKENS >= T
    dummy = status
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
        x_words.shape[1], num_sf, row_pitch // 4, aux_base // 4, aux_pitch // 4, off_sf, off_meta, ready_word,
        freed_word, notified_word, counts_word, count_stride, slot_counts_word, slot_blocks,
        senders(num_programs, SENDER_SHARE) if pipelined else num_programs, timeout_ns,
        WAIT_FREED=wait_freed, COUNTS_FROM_PEERS=counts_from_peers, PLACE=block_base is not None,
        HAS_SF=sf is not None, HAS_WEIGHTS=topk_weights is not None, PIPELINED=pipelined,
        COUNT=pipelined or count_arrivals, END_OP=pipelined and end_op, FUSED=fused, PREFETCH=prefetch,
        BT=bt, BW=bw, BR=block_size(num_ranks), BK=block_size(k), BSF=block_size(num_sf), CB=BLOCK_TOKENS,
        num_warps=warps,
    )


def epilogue(*, heap_words, data_ptrs, signal_ptrs, counter, status, psum, recv_x_words, recv_sf, recv_topk_idx,
             recv_topk_weights, recv_src_metadata, rank, num_ranks, seq_ptr, num_local_experts, T, slot_layout,
             ready_word, freed_word, timeout_ns, num_programs, copy_x=True, zero_counts=False, slot_counts_word=0,
             slot_blocks=0):
    """Launch the epilogue: the peers' rows from this rank's receive regions into the outputs.
    ``copy_x=False``: everything but the row data, and the dispatch does not end here: the caller
    copies the rows (copy engine), then raises ``freed`` (``primitives.release``). ``zero_counts``:
    the push counted rows into the slot counters (``count_arrivals``); zero them."""
    row_pitch, aux_base, aux_pitch, off_sf, off_meta = slot_layout
    k = recv_src_metadata.shape[1] - 2
    num_sf = recv_sf.shape[1] if recv_sf is not None else 0
    recv_sf = recv_sf.view(torch.int32) if recv_sf is not None else None
    dummy = status
    launch(_epilogue_kernel, num_programs,
        heap_words, data_ptrs, signal_ptrs, counter, status, psum,
        recv_x_words, recv_sf if recv_sf is not None else dummy,
        recv_sf.stride(0) if recv_sf is not None else 0, recv_sf.stride(1) if recv_sf is not None else 0,
        recv_topk_idx, recv_topk_weights if recv_topk_weights is not None else dummy, recv_src_metadata,
        rank, num_ranks, seq_ptr, k, num_local_experts, T, recv_x_words.shape[1], num_sf, row_pitch // 4,
        aux_base // 4, aux_pitch // 4, off_sf, off_meta, ready_word, freed_word, slot_counts_word, slot_blocks,
        timeout_ns, HAS_SF=recv_sf is not None, HAS_WEIGHTS=recv_topk_weights is not None, COPY_X=copy_x,
        ZERO_COUNTS=zero_counts,
        BT=EPILOGUE_TOKENS if copy_x else META_TOKENS, BW=EPILOGUE_WORDS, BR=block_size(num_ranks), BK=block_size(k), BSF=block_size(num_sf),
        num_warps=EPILOGUE_WARPS,
    )


def arrivals(*, heap_words, signal_ptrs, status, psum, recv_sf, recv_topk_idx, recv_topk_weights,
             recv_src_metadata, rank, source, first, rows, seq_ptr, num_local_experts, T, slot_layout,
             slot_counts_word, slot_blocks, timeout_ns):
    """One program, on a side stream beside the push of a dispatch whose rows the copy engine moves
    out (``push(count_arrivals=True)`` on every rank): wait until slots ``first .. first + rows`` of
    ``source``'s receive region are all in (its per-16-slot counters, which this zeroes), then copy
    their scales, ids, weights and metadata to output rows ``psum[source - 1] + slot``; the caller
    queues the copy of their row data after it on the same stream. ``first``: a multiple of
    ``BLOCK_TOKENS``; ``first + rows``: one too, or the region's end."""
    row_pitch, aux_base, aux_pitch, off_sf, off_meta = slot_layout
    k = recv_src_metadata.shape[1] - 2
    num_sf = recv_sf.shape[1] if recv_sf is not None else 0
    recv_sf = recv_sf.view(torch.int32) if recv_sf is not None else None
    launch(_arrivals_kernel, 1,
           heap_words, signal_ptrs, status, psum, recv_sf if recv_sf is not None else status,
           recv_sf.stride(0) if recv_sf is not None else 0, recv_sf.stride(1) if recv_sf is not None else 0,
           recv_topk_idx, recv_topk_weights if recv_topk_weights is not None else status, recv_src_metadata,
           rank, source, first, rows, seq_ptr, k, num_local_experts, T, num_sf, row_pitch // 4, aux_base // 4,
           aux_pitch // 4, off_sf, off_meta, slot_counts_word, slot_blocks, timeout_ns,
           HAS_SF=recv_sf is not None, HAS_WEIGHTS=recv_topk_weights is not None, BT=BLOCK_TOKENS, BC=64,
           BM=ARRIVAL_TOKENS, BK=block_size(k), BSF=block_size(num_sf), num_warps=ARRIVAL_WARPS)


def gather(*, heap, x, sf, topk_idx, topk_weights, recv_x, recv_sf, recv_topk_idx, recv_topk_weights,
           recv_src_metadata, psum, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, num_local_experts, T,
           broadcast_layout, flags_word, flag_blocks, ready_word, freed_word, timeout_ns, num_programs,
           tile=(EPILOGUE_TOKENS, EPILOGUE_WORDS, EPILOGUE_WARPS)):
    """The receive side of the copy-engine cached dispatch: every peer ``s`` copies all of its
    tokens to this rank's ``broadcast_layout`` (:func:`tritonep.sizing.broadcast_layout`: rows,
    scales, ids, weights at
    index ``s * T + t``) in chunks, each chunk raising ``flags[s][t // 64] = -1`` for its tokens;
    output row ``i`` (source index ``g = recv_src_metadata[i, 0]``) is gathered from there as soon
    as its flag is up, or from this rank's own ``x``/``sf``/``topk_idx``/``topk_weights`` when
    ``g`` is its own (those must be contiguous, 16-byte aligned). Ids become local expert ids (-1
    elsewhere). The last program zeroes the flags, waits for every peer's ``ready == seq`` (raised
    by :func:`tritonep.kernels.primitives.enter`) and raises ``freed = seq``.

    Shapes: ``x`` ``[n, row_bytes]`` any dtype; ``sf`` ``[n, P]`` 4-byte packs or None; ``psum``
    ``[R]`` int32 (rows received, inclusive prefix by source: only ``psum[-1]`` rows are gathered);
    ``topk_idx`` ``[n, k]`` int64; ``topk_weights`` ``[n, k]`` float32 or None; outputs as
    :func:`epilogue` (``recv_src_metadata`` is only read). ``tile``: (rows, 4-byte words, warps) per
    program step."""
    num_recv, k = recv_topk_idx.shape
    x_words = x.shape[1] * x.element_size() // 4
    num_sf = sf.shape[1] if sf is not None else 0
    off_sf, off_topk, off_w, _ = broadcast_layout
    base = heap.data_ptr()
    recv_sf_words = recv_sf.view(torch.int32) if recv_sf is not None else None
    launch(_gather_kernel, num_programs,
           heap.view(torch.int32), heap.view(torch.int64), (x.data_ptr() - base) // 4,
           (sf.data_ptr() - base) // 4 if sf is not None else 0, (topk_idx.data_ptr() - base) // 8,
           (topk_weights.data_ptr() - base) // 4 if topk_weights is not None else 0,
           recv_x.view(torch.int32), recv_sf_words if recv_sf is not None else status,
           recv_sf_words.stride(0) if recv_sf is not None else 0, recv_sf_words.stride(1) if recv_sf is not None else 0,
           recv_topk_idx, recv_topk_weights if recv_topk_weights is not None else status, recv_src_metadata, psum,
           signal_ptrs, counter, status, rank, num_ranks, seq_ptr, num_recv, k, num_local_experts, T, x_words, num_sf,
           off_sf // 4, off_topk // 8, off_w // 4, flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
           HAS_SF=sf is not None, HAS_WEIGHTS=recv_topk_weights is not None, BT=tile[0], BW=tile[1],
           BR=block_size(num_ranks), BK=block_size(k), BSF=block_size(max(num_sf, 1)), num_warps=tile[2])


__all__ = ["push", "push_tile", "epilogue", "arrivals", "gather"]
