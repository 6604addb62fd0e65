"""Low-latency dispatch and combine (DeepEP V1's LL mode): small batches, one launch per phase, no
host synchronisation, capturable in CUDA graphs.

Heap of one (phase, half): the two halves alternate between calls so that two operations of a kind
can be outstanding (V1's rule). Offsets are per call (they depend on ``T``, ``H``, ``E``, ``k``):

* dispatch area ``D``: ``[L][R][T]`` message slots of ``msg`` bytes at the receiver: the token row
  (bf16, or fp8 + float32 scales at ``off_sf``), then its source token and top-k slot (int32 each
  at ``off_tail``);
* combine area ``C``: ``[k][T]`` bf16 rows at the origin (the expert output for token ``t``, slot ``s``).

Signal words (per half): dispatch counts and flags ``[L][R]`` (rows sent by source ``r`` to local
expert ``l``, then ``seq``), combine flags ``[E]`` (expert ``e`` sent its rows back: ``seq``). A
flag holds the number of the half's operation (``seq``, 1, 2, ...): the senders read it from the
device word of their (phase, half), the receivers too, and the receive launch's last program
advances it. No flag is ever reset, so replays of a CUDA graph keep counting.

Launches: ``dispatch_send`` (``chunks`` programs per global expert: the tokens that chose it, in
token order, to their slots at the expert's rank, shared round-robin; FP8 cast on the way; the
expert's last program raises its count and flag), ``dispatch_recv`` (a program per
local expert: wait for every source's flag, then pack the rows as ``[L, R*T, H]``), ``combine_send``
(a program per (local expert, source): the rows back into the origin's ``C`` at their token and
slot), ``combine_recv`` (a program per token: wait for the flags of its experts only, then the
weighted sum in fp32, slot order, one rounding).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRET
from .launch import launch
from .primitives import (arrive, copy_words, device_fn, int32_ptr, now_ns, poisoned, record_timeout, to_bf16,
                         wait_words)
from .quant import quantize_row

OP_LL_DISPATCH = tl.constexpr(6)
OP_LL_COMBINE = tl.constexpr(7)
#: the weighted sum rounds the product before adding it (as torch does), on every GPU
NO_FMA = {} if INTERPRET else {"enable_fp_fusion": False}


@device_fn
def _alive(mask_ptr, r, SHRINK: tl.constexpr):
    """Whether rank ``r`` takes part (shrink mode: not masked)."""
    if SHRINK:
        return tl.load(mask_ptr + r) == 0
    return r >= 0


@device_fn
def _alive_lanes(mask_ptr, ranks, mask, SHRINK: tl.constexpr):
    """``_alive`` of a vector of ranks (lanes outside ``mask``: true)."""
    if SHRINK:
        return tl.load(mask_ptr + ranks, mask=mask, other=0) == 0
    return ranks >= 0


@device_fn
def _settle(flags, want, seq, late, mask_ptr, ranks, status_ptr, op, rank, SHRINK: tl.constexpr):
    """After a wait for ``flags == seq`` on the lanes ``want`` (``late``: the wait's verdict): the
    lanes whose flag came. Shrink mode masks the rank of every lane that did not (a dead rank is
    left out from then on); otherwise a timeout is recorded in the status words."""
    if SHRINK:
        v = tl.atomic_add(flags, 0, mask=want, sem="acquire", scope="sys")
        missing = want & (v != seq)
        tl.store(mask_ptr + ranks, 1, mask=missing & (ranks != rank))
        return want & (v == seq)
    lane = tl.arange(0, want.shape[0])
    record_timeout(status_ptr, tl.where(late >= 0, tl.sum(tl.where(lane == late, ranks, 0)), -1), op, seq)
    return want & ((lane * 0 + late) < 0)


@triton.jit
def _dispatch_send_kernel(x_ptr, topk_ptr, data_ptrs, signal_ptrs, seq_ptr, counter_ptr, status_ptr, mask_ptr, rank,
                          n, num_topk, num_local_experts, num_ranks, T, hidden, x_words, msg_bytes, off_sf, off_tail,
                          area, count_word, flag_word, chunks, QUANT: tl.constexpr, ROUND: tl.constexpr,
                          SHRINK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BW: tl.constexpr,
                          GROUPS: tl.constexpr):
    # ``chunks`` programs per expert share its tokens round-robin; the last to finish raises the flag
    e = tl.program_id(0) // chunks
    part = tl.program_id(0) % chunks
    dest = e // num_local_experts
    local = e % num_local_experts
    seq = tl.load(seq_ptr) % 32767 + 1
    offs_k = tl.arange(0, BK)
    peer = tl.load(data_ptrs + dest)
    region = peer + area + ((local * num_ranks + rank) * T).to(tl.int64) * msg_bytes
    count = e * 0  # a tensor from the start: n may be specialized to a constant
    alive = _alive(mask_ptr, dest, SHRINK)  # nothing goes to a masked rank
    if (poisoned(status_ptr) == 0) & alive:
        for t0 in range(0, n, BT):
            t = t0 + tl.arange(0, BT)
            mt = t < n
            ids = tl.load(topk_ptr + tl.expand_dims(t.to(tl.int64) * num_topk, 1) + tl.expand_dims(offs_k, 0),
                          mask=tl.expand_dims(mt, 1) & tl.expand_dims(offs_k < num_topk, 0), other=-1)
            hit = ids == e
            sel = tl.max(hit.to(tl.int32), axis=1) > 0
            slot = tl.max(tl.where(hit, tl.expand_dims(offs_k, 0), -1), axis=1)
            pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1  # rank among this block's chosen tokens
            for j in range((part - count % chunks + chunks) % chunks, tl.sum(sel.to(tl.int32)), chunks):
                tok = tl.max(tl.where(sel & (pos == j), t, -1))
                s = tl.max(tl.where(sel & (pos == j), slot, -1))
                dst = region + (count + j).to(tl.int64) * msg_bytes
                if QUANT:
                    quantize_row(x_ptr + tok.to(tl.int64) * hidden, dst, off_sf, hidden, ROUND, GROUPS)
                else:
                    copy_words(int32_ptr(x_ptr) + tok.to(tl.int64) * x_words, int32_ptr(dst), x_words, BW)
                tl.store(int32_ptr(dst + off_tail), tok)
                tl.store(int32_ptr(dst + off_tail + 4), s)
            count += tl.sum(sel.to(tl.int32))
    # the expert's last program (after every program's rows: see ``arrive``) sends the count and the flag
    if arrive(counter_ptr + e, chunks) & alive:
        sig = tl.load(signal_ptrs + dest) + ((local * num_ranks + rank) * 4).to(tl.int64)
        tl.store(int32_ptr(sig + count_word * 4), count)
        tl.atomic_xchg(int32_ptr(sig + flag_word * 4), seq, sem="release", scope="sys")


@triton.jit
def _dispatch_recv_kernel(recv_x_ptr, recv_sf_ptr, src_info_ptr, slot_info_ptr, layout_ptr, count_ptr, stats_ptr,
                          wait_ptr, data_ptrs, signal_ptrs, seq_ptr, counter_ptr, status_ptr, mask_ptr, rank,
                          num_ranks, T, x_words, num_sf, msg_bytes, off_sf, off_tail, area, count_word, flag_word,
                          timeout_ns, HAS_SF: tl.constexpr, UE8M0: tl.constexpr, HAS_STATS: tl.constexpr,
                          HAS_WAIT: tl.constexpr, SHRINK: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr,
                          BSF: tl.constexpr):
    local = tl.program_id(0)
    seq = tl.load(seq_ptr) % 32767 + 1
    offs_r = tl.arange(0, BR)
    mr = offs_r < num_ranks
    sig = tl.load(signal_ptrs + rank) + ((local * num_ranks + offs_r) * 4).to(tl.int64)
    skip = poisoned(status_ptr)
    start = now_ns()
    want = mr & _alive_lanes(mask_ptr, offs_r, mr, SHRINK)
    first = tl.atomic_add(int32_ptr(sig + flag_word * 4), 0, mask=mr, sem="acquire", scope="sys")
    late = wait_words(int32_ptr(sig + flag_word * 4), want, seq, timeout_ns, skip)
    here = _settle(int32_ptr(sig + flag_word * 4), want, seq, late, mask_ptr, offs_r, status_ptr, OP_LL_DISPATCH,
                   rank, SHRINK)
    counts = tl.where(here & ((offs_r * 0 + skip) == 0), tl.load(int32_ptr(sig + count_word * 4), mask=mr, other=0),
                      0)
    begin = tl.cumsum(counts, axis=0) - counts
    total = tl.sum(counts)
    rows = num_ranks * T
    tl.store(layout_ptr + local * num_ranks + offs_r, (begin.to(tl.int64) << 32) | counts.to(tl.int64), mask=mr)
    tl.store(count_ptr + local, total)
    if HAS_STATS:
        tl.atomic_add(stats_ptr + local, total, sem="relaxed")
    if HAS_WAIT:  # the time spent waiting, charged to every source that was not there at the first look
        waited = now_ns() - start
        tl.atomic_add(wait_ptr + offs_r, tl.where(first != seq, waited, 0), mask=mr, sem="relaxed")
    me = tl.load(data_ptrs + rank)
    offs_sf = tl.arange(0, BSF)
    for s in range(num_ranks):
        c = tl.sum(tl.where(offs_r == s, counts, 0))
        b = tl.sum(tl.where(offs_r == s, begin, 0))
        for j in range(c):
            msg = me + area + ((local * num_ranks + s) * T + j).to(tl.int64) * msg_bytes
            row = (local * rows + b + j).to(tl.int64)
            copy_words(int32_ptr(msg), int32_ptr(recv_x_ptr) + row * x_words, x_words, BW)
            if HAS_SF:
                sf = tl.load((msg + off_sf + offs_sf * 4).to(tl.pointer_type(tl.float32)), mask=offs_sf < num_sf,
                             other=0.0)
                if UE8M0:  # the exponent byte of each power-of-two scale, four per int32, column-major
                    e8 = (sf.to(tl.int32, bitcast=True) >> 23) & 0xFF
                    grp = tl.reshape(e8, (BSF // 4, 4))
                    packed = tl.sum(grp << (tl.arange(0, 4) * 8)[None, :], axis=1)
                    offs_p = tl.arange(0, BSF // 4)
                    tl.store(recv_sf_ptr + local * rows * (num_sf // 4) + offs_p * rows + b + j, packed,
                             mask=offs_p < num_sf // 4)
                else:  # column-major: [L][num_sf][R * T]
                    tl.store(recv_sf_ptr.to(tl.pointer_type(tl.float32)) + local * rows * num_sf + offs_sf * rows
                             + b + j, sf, mask=offs_sf < num_sf)
            tl.store(src_info_ptr + row, tl.load(int32_ptr(msg + off_tail)))
            tl.store(slot_info_ptr + row, tl.load(int32_ptr(msg + off_tail + 4)))
    if arrive(counter_ptr, tl.num_programs(0)):
        tl.store(seq_ptr, seq)


@triton.jit
def _combine_send_kernel(y_ptr, layout_ptr, src_info_ptr, slot_info_ptr, data_ptrs, signal_ptrs, seq_ptr, status_ptr,
                         mask_ptr, rank, num_ranks, num_local_experts, T, y_words, area, flag_word,
                         SHRINK: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    local = pid // num_ranks
    origin = pid % num_ranks
    seq = tl.load(seq_ptr) % 32767 + 1
    rng = tl.load(layout_ptr + local * num_ranks + origin)
    begin = (rng >> 32).to(tl.int32)
    count = (rng & 0xFFFFFFFF).to(tl.int32)
    peer = tl.load(data_ptrs + origin)
    rows = num_ranks * T
    alive = _alive(mask_ptr, origin, SHRINK)
    if (poisoned(status_ptr) == 0) & alive:
        for j in range(count):
            row = (local * rows + begin + j).to(tl.int64)
            tok = tl.load(src_info_ptr + row)
            s = tl.load(slot_info_ptr + row)
            dst = peer + area + (s * T + tok).to(tl.int64) * (y_words * 4)
            copy_words(int32_ptr(y_ptr) + row * y_words, int32_ptr(dst), y_words, BW)
    tl.debug_barrier()
    e = rank * num_local_experts + local
    sig = tl.load(signal_ptrs + origin) + ((flag_word + e) * 4).to(tl.int64)
    if alive:
        tl.atomic_xchg(int32_ptr(sig), seq, sem="release", scope="sys")


@triton.jit
def _combine_recv_kernel(out_ptr, topk_ptr, w_ptr, data_ptrs, signal_ptrs, seq_ptr, counter_ptr, status_ptr,
                         wait_ptr, mask_ptr, rank, n, num_ranks, num_local_experts, num_experts, num_topk, T, hidden,
                         area, flag_word, timeout_ns, HAS_WAIT: tl.constexpr, SHRINK: tl.constexpr,
                         BK: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0)  # (with no token, one program only advances the operation number)
    seq = tl.load(seq_ptr) % 32767 + 1
    offs_k = tl.arange(0, BK)
    mk = (offs_k < num_topk) & ((offs_k * 0 + t) < n)
    ids = tl.load(topk_ptr + t * num_topk + offs_k, mask=mk, other=-1)
    valid = mk & (ids >= 0) & (ids < num_experts)
    owner = tl.where(valid, ids // num_local_experts, 0)
    valid = valid & _alive_lanes(mask_ptr, owner, valid, SHRINK)
    sig = tl.load(signal_ptrs + rank) + ((flag_word + tl.where(valid, ids, 0)) * 4).to(tl.int64)
    skip = poisoned(status_ptr)
    start = now_ns()
    late = wait_words(int32_ptr(sig), valid, seq, timeout_ns, skip)
    # (the expert's rank is the one that never answered)
    valid = _settle(int32_ptr(sig), valid, seq, late, mask_ptr, owner, status_ptr, OP_LL_COMBINE, rank, SHRINK)
    if HAS_WAIT:
        tl.atomic_add(wait_ptr + owner, tl.where(valid, now_ns() - start, 0), mask=valid, sem="relaxed")
    w = tl.load(w_ptr + t * num_topk + offs_k, mask=valid, other=0.0)
    me = tl.load(data_ptrs + rank)
    for h0 in range(0, hidden, BH):
        cols = h0 + tl.arange(0, BH)
        mh = cols < hidden
        acc = tl.zeros([BH], dtype=tl.float32)
        for s in tl.static_range(BK):  # unrolled: every slot's row in flight at once
            w_s = tl.sum(tl.where(offs_k == s, w, 0.0))
            on = (cols * 0 + tl.sum(tl.where(offs_k == s, valid.to(tl.int32), 0))) > 0  # [BH]
            rows = (me + area + (s * T + t).to(tl.int64) * (hidden * 2)).to(tl.pointer_type(tl.bfloat16))
            v = tl.load(rows + cols, mask=mh & on, other=0.0).to(tl.float32)
            acc = tl.where(on, acc + w_s * v, acc)
        tl.store(out_ptr + t.to(tl.int64) * hidden + cols, to_bf16(acc), mask=mh & ((cols * 0 + t) < n))
    if arrive(counter_ptr, tl.num_programs(0)):
        tl.store(seq_ptr, seq)


def dispatch_send(*, x, topk_idx, heap, seq, counters, status, mask, rank, num_local_experts, num_ranks, T, layout,
                  quantize, round_scale, groups, chunks):
    """``counters``: ``[E]`` int32 zeros (each launch leaves them zero); ``mask``: ``[R]`` int32 of
    shrink mode (nonzero: the rank is left out) or None."""
    n, k = topk_idx.shape
    H = x.shape[1]
    launch(_dispatch_send_kernel, num_local_experts * num_ranks * chunks, x, topk_idx, heap.data_ptrs,
           heap.signal_ptrs, seq, counters, status, _mask(mask, status), rank, n, k, num_local_experts, num_ranks, T,
           H, H // 2, layout.msg_bytes, layout.off_sf, layout.off_tail, layout.dispatch_area, layout.count_word,
           layout.dispatch_flag_word, chunks, QUANT=quantize, SHRINK=mask is not None,
           ROUND=round_scale, BT=_pow2(min(max(n, 1), 128)), BK=_pow2(k), BW=_pow2(min(H // 2, 2048)), GROUPS=groups)


def dispatch_recv(*, recv_x, recv_sf, src_info, slot_info, layout_range, recv_count, stats, wait_stats, heap, seq,
                  counter, status, mask, rank, num_ranks, T, layout, timeout_ns, ue8m0):
    L = recv_count.shape[0]
    x_words = recv_x.shape[2] * recv_x.element_size() // 4
    num_sf = layout.num_sf
    launch(_dispatch_recv_kernel, L, recv_x, recv_sf if recv_sf is not None else recv_count, src_info, slot_info,
           layout_range, recv_count, stats if stats is not None else recv_count,
           wait_stats if wait_stats is not None else layout_range, heap.data_ptrs, heap.signal_ptrs, seq, counter,
           status, _mask(mask, status), rank, num_ranks, T, x_words, num_sf, layout.msg_bytes, layout.off_sf,
           layout.off_tail, layout.dispatch_area, layout.count_word, layout.dispatch_flag_word, timeout_ns,
           HAS_SF=recv_sf is not None, UE8M0=ue8m0, HAS_STATS=stats is not None, HAS_WAIT=wait_stats is not None,
           SHRINK=mask is not None, BR=_pow2(num_ranks), BW=_pow2(min(x_words, 2048)), BSF=max(_pow2(num_sf), 4))


def combine_send(*, y, layout_range, src_info, slot_info, heap, seq, status, mask, rank, num_ranks, T, layout):
    L = layout_range.shape[0]
    y_words = y.shape[2] // 2
    launch(_combine_send_kernel, L * num_ranks, y, layout_range, src_info, slot_info, heap.data_ptrs,
           heap.signal_ptrs, seq, status, _mask(mask, status), rank, num_ranks, L, T, y_words, layout.combine_area,
           layout.combine_flag_word, SHRINK=mask is not None, BW=_pow2(min(y_words, 2048)))


def combine_recv(*, out, topk_idx, topk_weights, heap, seq, counter, status, mask, wait_stats, rank, num_ranks,
                 num_local_experts, T, layout, timeout_ns):
    n, k = topk_idx.shape
    H = out.shape[1]
    launch(_combine_recv_kernel, max(n, 1), out, topk_idx, topk_weights, heap.data_ptrs, heap.signal_ptrs, seq,
           counter, status, wait_stats if wait_stats is not None else counter, _mask(mask, status), rank, n,
           num_ranks, num_local_experts, num_local_experts * num_ranks, k, T, H, layout.combine_area,
           layout.combine_flag_word, timeout_ns, HAS_WAIT=wait_stats is not None, SHRINK=mask is not None,
           BK=_pow2(k), BH=_pow2(min(H, 8192)), num_warps=8, **NO_FMA)


def _mask(mask, placeholder):
    return mask if mask is not None else placeholder


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))
