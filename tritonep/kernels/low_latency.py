"""Low-latency dispatch and combine (DeepEP V1's LL mode): small batches, one launch per phase, no
host synchronisation, capturable in CUDA graphs.

Heap of one (phase, half): the two halves alternate between calls so that two operations of a kind
can be outstanding (V1's rule). Offsets are per call (they depend on ``T``, ``H``, ``E``, ``k``):

* dispatch area ``D``: ``[L][R][T]`` message slots of ``msg`` bytes at the receiver: the token row
  (bf16, or fp8 + float32 scales at ``off_sf``), then its source token and top-k slot (int32 each
  at ``off_tail``);
* combine area ``C``: ``[k][T]`` bf16 rows at the origin (the expert output for token ``t``, slot ``s``).

Signal words (per half): dispatch counts and flags ``[L][R]`` (rows sent by source ``r`` to local
expert ``l``, then ``seq``), combine flags ``[E]`` (expert ``e`` sent its rows back: ``seq``), and
for capped dispatches ``over[R]`` / ``announced[R]`` (the ranks' verdicts, as the symmetric
backend's). A flag holds the number of the half's operation (``seq``, 1, 2, ...): the senders read
it from the device word of their (phase, half), the receivers too, and the receive launch's last
program advances it. No flag is ever reset, so replays of a CUDA graph keep counting.

Launches (each splits its work items into ``parts`` programs, enough for ``SPREAD`` programs per SM):

* ``dispatch_send``, programs per token: read the row once (FP8 cast on the way, a chunk of
  ``QUANT_GROUPS`` x 128 channels at a time, the chunks shared by the token's programs) and store it
  at every expert the row chose, in the slot that keeps each expert's rows in token order (counted
  from the earlier tokens' top-k ids, so no atomics decide the order). The launch's last program
  sends every expert its row count and flag.
* ``dispatch_recv``, programs per local expert: wait for every source's flag, then pack the rows
  as ``[L, R*T, H]`` (or fewer rows per expert: a capped dispatch, whose last program exchanges
  the ranks' verdicts), several rows per step.
* ``combine_send``, programs per (local expert, origin): the rows back into the origin's ``C`` at
  their token and slot; the pair's last program raises the flag.
* ``combine_recv``, programs per token (each a share of the channels): wait for the flags of the
  token's experts only, then the weighted sum in fp32, slot order, one rounding.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRET
from .launch import launch
from .primitives import (announce_rows, arrive, device_fn, int32_ptr, now_ns, poisoned, record_overflow,
                         record_timeout, to_bf16, verdict_of, wait_words)
from .quant import quantize_groups

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


@device_fn
def _pick(v, lanes, s):
    """Lane ``s`` of the vector ``v`` as a scalar."""
    return tl.sum(tl.where(lanes == s, v, 0))


@device_fn
def _first_slots(ids, valid, offs_k):
    """``valid`` lanes that hold the first slot of their expert in the row (a row naming an expert
    twice sends it once, at its first slot, as the reference does)."""
    same = tl.expand_dims(ids, 1) == tl.expand_dims(ids, 0)
    earlier = same & (tl.expand_dims(offs_k, 0) < tl.expand_dims(offs_k, 1))
    return valid & (tl.max((earlier & tl.expand_dims(valid, 0)).to(tl.int32), axis=1) == 0)


@triton.jit
def _dispatch_send_kernel(x_ptr, topk_ptr, data_ptrs, signal_ptrs, seq_ptr, counter_ptr, count_ptr, status_ptr,
                          mask_ptr, rank, n, num_topk, num_local_experts, num_experts, num_ranks, T, hidden, x_words,
                          msg_bytes, off_sf, off_tail, area, count_word, flag_word, parts, QUANT: tl.constexpr,
                          ROUND: tl.constexpr, SHRINK: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          BW: tl.constexpr, GROUPS: tl.constexpr, BE: tl.constexpr):
    # ``parts`` programs per token, each reading (and casting) the column chunks ``part, part + parts,
    # ...`` of its row once and storing them at every slot the row goes to
    t = tl.program_id(0) // parts
    part = tl.program_id(0) % parts
    seq = tl.load(seq_ptr) % 32767 + 1
    offs_k = tl.arange(0, BK)
    live = (offs_k < num_topk) & ((offs_k * 0 + t) < n)
    ids = tl.load(topk_ptr + t.to(tl.int64) * num_topk + offs_k, mask=live, other=-1).to(tl.int32)
    ok = _first_slots(ids, live & (ids >= 0) & (ids < num_experts), offs_k)
    dest = tl.where(ok, ids // num_local_experts, 0)
    ok = ok & _alive_lanes(mask_ptr, dest, ok, SHRINK) & ((offs_k * 0 + poisoned(status_ptr).to(tl.int32)) == 0)
    # the row's slot at each expert: the earlier tokens that chose that expert (token order)
    pos = offs_k * 0
    for t0 in range(0, t, BT):
        tt = t0 + tl.arange(0, BT)
        blk = tl.load(topk_ptr + tl.expand_dims(tt.to(tl.int64) * num_topk, 1) + tl.expand_dims(offs_k, 0),
                      mask=tl.expand_dims(tt < t, 1) & tl.expand_dims(offs_k < num_topk, 0), other=-1).to(tl.int32)
        hit = tl.expand_dims(blk, 0) == tl.expand_dims(tl.expand_dims(ids, 1), 2)  # [slot, token, column]
        pos += tl.sum(tl.max(hit.to(tl.int32), axis=2), axis=1)
    peer = tl.load(data_ptrs + dest, mask=ok, other=0)
    dst = peer + area + (((ids % num_local_experts) * num_ranks + rank) * T + pos).to(tl.int64) * msg_bytes
    if QUANT:
        block = tl.reshape(tl.arange(0, GROUPS * 128), (GROUPS, 128))
        for g0 in range(part * GROUPS, hidden // 128, parts * GROUPS):
            offs = g0 * 128 + block
            m = offs < hidden
            offs_g = g0 + tl.arange(0, GROUPS)
            q, scale = quantize_groups(tl.load(x_ptr + t.to(tl.int64) * hidden + offs, mask=m & ((offs * 0 + t) < n),
                                               other=0.0).to(tl.float32), ROUND)
            for s in tl.static_range(BK):
                if _pick(ok.to(tl.int32), offs_k, s) != 0:
                    d = _pick(dst, offs_k, s)
                    tl.store((d + offs).to(tl.pointer_type(tl.float8e4nv)), q, mask=m)
                    tl.store((d + off_sf + offs_g * 4).to(tl.pointer_type(tl.float32)), scale,
                             mask=offs_g < hidden // 128)
    else:
        for w0 in range(part * BW, x_words, parts * BW):
            offs_w = w0 + tl.arange(0, BW)
            m = offs_w < x_words
            v = tl.load(int32_ptr(x_ptr) + t.to(tl.int64) * x_words + offs_w, mask=m & ((offs_w * 0 + t) < n))
            for s in tl.static_range(BK):
                if _pick(ok.to(tl.int32), offs_k, s) != 0:
                    tl.store(int32_ptr(_pick(dst, offs_k, s)) + offs_w, v, mask=m)
    first = ok & ((offs_k * 0 + part) == 0)
    tl.store(int32_ptr(dst + off_tail), t, mask=first)
    tl.store(int32_ptr(dst + off_tail + 4), offs_k, mask=first)
    tl.atomic_add(count_ptr + ids, 1, mask=first, sem="relaxed", scope="gpu")
    # the last program (after every program's rows: see ``arrive``) sends each expert its count and flag
    if arrive(counter_ptr, tl.num_programs(0)):
        for e0 in range(0, num_experts, BE):
            e = e0 + tl.arange(0, BE)
            me = e < num_experts
            count = tl.atomic_xchg(count_ptr + e, 0, mask=me, sem="relaxed", scope="gpu")
            to = e // num_local_experts
            me = me & _alive_lanes(mask_ptr, to, me, SHRINK)  # nothing goes to a masked rank
            sig = tl.load(signal_ptrs + to, mask=me, other=0) + (((e % num_local_experts) * num_ranks + rank) * 4)
            tl.store(int32_ptr(sig + count_word * 4), count, mask=me)
            tl.atomic_xchg(int32_ptr(sig + flag_word * 4), seq + e * 0, mask=me, sem="release", scope="sys")


@device_fn
def _source_of(rows, begin, counts, offs_r, mr):
    """For row indices ``rows`` ``[BJ]`` of an expert's packed output: the source rank of each
    and its row within that source's block (``begin``/``counts`` ``[BR]``: the sources' blocks)."""
    done = tl.expand_dims(begin + counts, 0) <= tl.expand_dims(rows, 1)
    src = tl.sum((done & tl.expand_dims(mr, 0)).to(tl.int32), axis=1)
    b = tl.sum(tl.where(tl.expand_dims(offs_r, 0) == tl.expand_dims(src, 1), tl.expand_dims(begin, 0), 0), axis=1)
    return src, rows - b


@triton.jit
def _dispatch_recv_kernel(recv_x_ptr, recv_sf_ptr, src_info_ptr, slot_info_ptr, layout_ptr, count_ptr, stats_ptr,
                          wait_ptr, data_ptrs, signal_ptrs, seq_ptr, counter_ptr, peak_ptr, status_ptr, mask_ptr, rank,
                          num_ranks, T, rows, x_words, num_sf, msg_bytes, off_sf, off_tail, area, count_word,
                          flag_word, over_word, announced_word, timeout_ns, parts, HAS_SF: tl.constexpr,
                          UE8M0: tl.constexpr, HAS_STATS: tl.constexpr, HAS_WAIT: tl.constexpr, SHRINK: tl.constexpr,
                          CAPPED: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr, BW: tl.constexpr,
                          BSF: tl.constexpr):
    # ``parts`` programs per local expert, each packing the row blocks ``part, part + parts, ...``;
    # ``rows`` per expert in the outputs (``R*T``, or fewer when CAPPED: no row past them is written)
    local = tl.program_id(0) // parts
    part = tl.program_id(0) % parts
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
    need = tl.sum(counts)
    total = tl.minimum(need, rows)
    if part == 0:
        kept = tl.maximum(tl.minimum(begin + counts, rows) - begin, 0)  # (all of them unless it overflowed)
        tl.store(layout_ptr + local * num_ranks + offs_r, (begin.to(tl.int64) << 32) | kept.to(tl.int64), mask=mr)
        tl.store(count_ptr + local, total)
        if CAPPED:
            tl.atomic_max(peak_ptr, need, sem="relaxed", scope="gpu")
        if HAS_STATS:
            tl.atomic_add(stats_ptr + local, total, sem="relaxed")
        if HAS_WAIT:  # the time spent waiting, charged to every source that was not there at the first look
            waited = now_ns() - start
            tl.atomic_add(wait_ptr + offs_r, tl.where(first != seq, waited, 0), mask=mr, sem="relaxed")
    me = tl.load(data_ptrs + rank)
    offs_w = tl.arange(0, BW)
    offs_sf = tl.arange(0, BSF)
    for i0 in range(part * BJ, total, parts * BJ):  # BJ rows at a time: their loads in flight together
        i = i0 + tl.arange(0, BJ)
        mi = i < total
        src, j = _source_of(i, begin, counts, offs_r, mr)
        msg = me + area + ((local * num_ranks + src) * T + j).to(tl.int64) * msg_bytes
        row = (local * rows + i).to(tl.int64)
        for w0 in range(0, x_words, BW):
            w = w0 + offs_w
            m2 = tl.expand_dims(mi, 1) & tl.expand_dims(w < x_words, 0)
            v = tl.load(int32_ptr(tl.expand_dims(msg, 1)) + tl.expand_dims(w, 0), mask=m2)
            tl.store(int32_ptr(recv_x_ptr) + tl.expand_dims(row * x_words, 1) + tl.expand_dims(w, 0), v, mask=m2)
        if HAS_SF:
            msf = tl.expand_dims(mi, 1) & tl.expand_dims(offs_sf < num_sf, 0)
            sf = tl.load((tl.expand_dims(msg + off_sf, 1) + tl.expand_dims(offs_sf * 4, 0)).to(
                tl.pointer_type(tl.float32)), mask=msf, other=0.0)
            ii = tl.expand_dims(i, 1)
            if UE8M0:  # the exponent byte of each power-of-two scale, four per int32, column-major
                e8 = (sf.to(tl.int32, bitcast=True) >> 23) & 0xFF
                packed = tl.sum(tl.reshape(e8, (BJ, BSF // 4, 4)) << (tl.arange(0, 4) * 8)[None, None, :], axis=2)
                offs_p = tl.arange(0, BSF // 4)
                tl.store(recv_sf_ptr + local * rows * (num_sf // 4) + tl.expand_dims(offs_p, 0) * rows + ii, packed,
                         mask=tl.expand_dims(mi, 1) & tl.expand_dims(offs_p < num_sf // 4, 0))
            else:  # column-major: [L][num_sf][R * T]
                tl.store(recv_sf_ptr.to(tl.pointer_type(tl.float32)) + local * rows * num_sf
                         + tl.expand_dims(offs_sf, 0) * rows + ii, sf, mask=msf)
        tl.store(src_info_ptr + row, tl.load(int32_ptr(msg + off_tail), mask=mi), mask=mi)
        tl.store(slot_info_ptr + row, tl.load(int32_ptr(msg + off_tail + 4), mask=mi), mask=mi)
    if arrive(counter_ptr, tl.num_programs(0)):
        if CAPPED:  # every rank learns whether any rank's experts overflowed, and records it alike
            _verdicts(peak_ptr, signal_ptrs, status_ptr, mask_ptr, rank, num_ranks, rows, over_word, announced_word,
                      seq, timeout_ns, SHRINK, BR)
        tl.store(seq_ptr, seq)


@device_fn
def _verdicts(peak_ptr, signal_ptrs, status_ptr, mask_ptr, rank, num_ranks, rows, over_word, announced_word, seq,
              timeout_ns, SHRINK: tl.constexpr, BR: tl.constexpr):
    """The last program of a capped dispatch receive: announce this rank's verdict (the most rows
    one of its experts needed, if more than ``rows``) to every rank, wait for every rank's, and
    record ``OP_RECV_OVERFLOW`` naming the first rank that overflowed. Every rank records it at the
    same dispatch, so every rank's later kernels do nothing alike (none waits for a stopped one)."""
    need = tl.atomic_xchg(peak_ptr, 0, sem="relaxed", scope="gpu")
    announce_rows(signal_ptrs, status_ptr, num_ranks, rank, over_word, announced_word, need, rows, seq, BR)
    offs_r = tl.arange(0, BR)
    mr = offs_r < num_ranks
    mine = tl.load(signal_ptrs + rank)
    want = mr & _alive_lanes(mask_ptr, offs_r, mr, SHRINK)
    late = wait_words(int32_ptr(mine + (announced_word + offs_r) * 4), want, seq, timeout_ns, poisoned(status_ptr))
    here = _settle(int32_ptr(mine + (announced_word + offs_r) * 4), want, seq, late, mask_ptr, offs_r, status_ptr,
                   OP_LL_DISPATCH, rank, SHRINK)
    first, rows_needed = verdict_of(signal_ptrs, rank, over_word, here, BR)
    record_overflow(poisoned(status_ptr) == 0, first, rows_needed, status_ptr, seq, BR)


@triton.jit
def _combine_send_kernel(y_ptr, layout_ptr, src_info_ptr, slot_info_ptr, data_ptrs, signal_ptrs, seq_ptr,
                         counters_ptr, status_ptr, mask_ptr, rank, num_ranks, num_local_experts, T, rows, y_words,
                         area, flag_word, parts, SHRINK: tl.constexpr, BJ: tl.constexpr, BW: tl.constexpr):
    # ``parts`` programs per (local expert, origin); the last of them raises the expert's flag there.
    # ``rows`` per expert in ``y`` (the dispatch's; its layout never names a row past them)
    pair = tl.program_id(0) // parts
    part = tl.program_id(0) % parts
    local = pair // num_ranks
    origin = pair % num_ranks
    seq = tl.load(seq_ptr) % 32767 + 1
    rng = tl.load(layout_ptr + local * num_ranks + origin)
    begin = (rng >> 32).to(tl.int32)
    count = (rng & 0xFFFFFFFF).to(tl.int32)
    peer = tl.load(data_ptrs + origin)
    alive = _alive(mask_ptr, origin, SHRINK)
    offs_w = tl.arange(0, BW)
    if (poisoned(status_ptr) == 0) & alive:
        for j0 in range(part * BJ, count, parts * BJ):
            j = j0 + tl.arange(0, BJ)
            mj = j < count
            row = (local * rows + begin + j).to(tl.int64)
            tok = tl.load(src_info_ptr + row, mask=mj, other=0)
            s = tl.load(slot_info_ptr + row, mask=mj, other=0)
            dst = peer + area + (s * T + tok).to(tl.int64) * (y_words * 4)
            for w0 in range(0, y_words, BW):
                w = w0 + offs_w
                m2 = tl.expand_dims(mj, 1) & tl.expand_dims(w < y_words, 0)
                v = tl.load(int32_ptr(y_ptr) + tl.expand_dims(row * y_words, 1) + tl.expand_dims(w, 0), mask=m2)
                tl.store(int32_ptr(tl.expand_dims(dst, 1)) + tl.expand_dims(w, 0), v, mask=m2)
    if arrive(counters_ptr + pair, parts) & alive:
        e = rank * num_local_experts + local
        sig = tl.load(signal_ptrs + origin) + ((flag_word + e) * 4).to(tl.int64)
        tl.atomic_xchg(int32_ptr(sig), seq, sem="release", scope="sys")


@triton.jit
def _combine_recv_kernel(out_ptr, topk_ptr, w_ptr, data_ptrs, signal_ptrs, seq_ptr, counter_ptr, status_ptr,
                         wait_ptr, mask_ptr, rank, n, num_ranks, num_local_experts, num_experts, num_topk, T, hidden,
                         area, flag_word, timeout_ns, parts, HAS_WAIT: tl.constexpr, SHRINK: tl.constexpr,
                         BK: tl.constexpr, BH: tl.constexpr):
    # ``parts`` programs per token, each summing the column blocks ``part, part + parts, ...``
    # (with no token, one program only advances the operation number)
    t = tl.program_id(0) // parts
    part = tl.program_id(0) % parts
    seq = tl.load(seq_ptr) % 32767 + 1
    offs_k = tl.arange(0, BK)
    mk = (offs_k < num_topk) & ((offs_k * 0 + t) < n)
    ids = tl.load(topk_ptr + t * num_topk + offs_k, mask=mk, other=-1).to(tl.int32)
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
        tl.atomic_add(wait_ptr + owner, tl.where(valid, now_ns() - start, 0), mask=valid & ((offs_k * 0 + part) == 0),
                      sem="relaxed")
    w = tl.load(w_ptr + t * num_topk + offs_k, mask=valid, other=0.0)
    # the row of a slot is at the expert's first slot in this token's row (see ``_first_slots``)
    same = (tl.expand_dims(ids, 1) == tl.expand_dims(ids, 0)) & tl.expand_dims(valid, 0)
    at = tl.min(tl.where(same, tl.expand_dims(offs_k, 0), BK), axis=1)
    me = tl.load(data_ptrs + rank)
    for h0 in range(part * BH, hidden, parts * BH):
        cols = h0 + tl.arange(0, BH)
        mh = cols < hidden
        acc = tl.zeros([BH], dtype=tl.float32)
        for s in tl.static_range(BK):  # unrolled: every slot's row in flight at once
            w_s = tl.sum(tl.where(offs_k == s, w, 0.0))
            on = (cols * 0 + _pick(valid.to(tl.int32), offs_k, s)) > 0  # [BH]
            rows = (me + area + (_pick(at, offs_k, s) * T + t).to(tl.int64) * (hidden * 2)).to(
                tl.pointer_type(tl.bfloat16))
            v = tl.load(rows + cols, mask=mh & on, other=0.0).to(tl.float32)
            acc = tl.where(on, acc + w_s * v, acc)
        tl.store(out_ptr + t.to(tl.int64) * hidden + cols, to_bf16(acc), mask=mh & ((cols * 0 + t) < n))
    if arrive(counter_ptr, tl.num_programs(0)):
        tl.store(seq_ptr, seq)


#: programs aimed at per SM when a launch splits its work items (tokens, experts) into parts
SPREAD = 2
#: groups of 128 channels per chunk of a row in the dispatch send (its programs share a row's chunks)
QUANT_GROUPS = 4


def _parts(items: int, most: int) -> int:
    """Programs per work item: enough for ``SPREAD`` per SM, at most ``most`` (2 under the
    interpreter, so that the CPU tests cover the split)."""
    if INTERPRET:
        return min(2, most)
    return max(1, min(most, SPREAD * _sms() // max(items, 1)))


_SMS = []


def _sms() -> int:
    if not _SMS:
        import torch

        _SMS.append(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return _SMS[0]


def dispatch_send(*, x, topk_idx, heap, seq, counter, counts, status, mask, rank, num_local_experts, num_ranks, T,
                  layout, quantize, round_scale):
    """``counter``: one int32 zero, ``counts``: ``[E]`` int32 zeros (each launch leaves them zero);
    ``mask``: ``[R]`` int32 of shrink mode (nonzero: the rank is left out) or None."""
    n, k = topk_idx.shape
    H = x.shape[1]
    E = num_local_experts * num_ranks
    groups = _pow2(min(H // 128, 2 if INTERPRET else QUANT_GROUPS))  # (CPU tests: rows of several chunks)
    BW = groups * 64  # as many columns per chunk in BF16 as in FP8
    parts = _parts(n, triton.cdiv(H // 128, groups) if quantize else triton.cdiv(H // 2, BW))
    launch(_dispatch_send_kernel, max(n, 1) * parts, x, topk_idx, heap.data_ptrs, heap.signal_ptrs, seq, counter,
           counts, status, _mask(mask, status), rank, n, k, num_local_experts, E, num_ranks, T, H, H // 2,
           layout.msg_bytes, layout.off_sf, layout.off_tail, layout.dispatch_area, layout.count_word,
           layout.dispatch_flag_word, parts, QUANT=quantize, SHRINK=mask is not None, ROUND=round_scale,
           BT=_pow2(min(max(n, 1), 128)), BK=_pow2(k), BW=BW, GROUPS=groups, BE=_pow2(min(E, 1024)),
           num_warps=8)


def dispatch_recv(*, recv_x, recv_sf, src_info, slot_info, layout_range, recv_count, stats, wait_stats, heap, seq,
                  counter, peak, status, mask, rank, num_ranks, T, layout, timeout_ns, ue8m0):
    """``recv_x`` ``[L, rows, H]``: ``rows`` below ``R*T`` caps the rows per expert (an expert that
    gets more stops the buffer on every rank, see ``_verdicts``); ``peak``: one int32 zero (each
    launch leaves it zero)."""
    L, rows = recv_count.shape[0], recv_x.shape[1]
    x_words = recv_x.shape[2] * recv_x.element_size() // 4
    num_sf = layout.num_sf
    BW = _pow2(min(x_words, 4096))
    parts = _parts(L, 8)
    launch(_dispatch_recv_kernel, L * parts, recv_x, recv_sf if recv_sf is not None else recv_count, src_info,
           slot_info, layout_range, recv_count, stats if stats is not None else recv_count,
           wait_stats if wait_stats is not None else layout_range, heap.data_ptrs, heap.signal_ptrs, seq, counter, peak,
           status, _mask(mask, status), rank, num_ranks, T, rows, x_words, num_sf, layout.msg_bytes, layout.off_sf,
           layout.off_tail, layout.dispatch_area, layout.count_word, layout.dispatch_flag_word, layout.over_word,
           layout.announced_word, timeout_ns, parts, HAS_SF=recv_sf is not None, UE8M0=ue8m0,
           HAS_STATS=stats is not None, HAS_WAIT=wait_stats is not None, SHRINK=mask is not None,
           CAPPED=rows < num_ranks * T, BR=_pow2(num_ranks), BJ=max(1, 8192 // BW), BW=BW, BSF=max(_pow2(num_sf), 4),
           num_warps=8)


def combine_send(*, y, layout_range, src_info, slot_info, heap, seq, counters, status, mask, rank, num_ranks, T,
                 layout):
    """``y`` ``[L, rows, H]`` bf16; ``counters``: ``[E]`` int32 zeros (each launch leaves them zero)."""
    L = layout_range.shape[0]
    y_words = y.shape[2] // 2
    BW = _pow2(min(y_words, 4096))
    parts = _parts(L * num_ranks, 8)
    launch(_combine_send_kernel, L * num_ranks * parts, y, layout_range, src_info, slot_info, heap.data_ptrs,
           heap.signal_ptrs, seq, counters, status, _mask(mask, status), rank, num_ranks, L, T, y.shape[1], y_words,
           layout.combine_area, layout.combine_flag_word, parts, SHRINK=mask is not None, BJ=max(1, 8192 // BW),
           BW=BW, num_warps=8)


def combine_recv(*, out, topk_idx, topk_weights, heap, seq, counter, status, mask, wait_stats, rank, num_ranks,
                 num_local_experts, T, layout, timeout_ns):
    n, k = topk_idx.shape
    H = out.shape[1]
    BH = _pow2(min(H, 1024))
    parts = _parts(n, triton.cdiv(H, BH))
    launch(_combine_recv_kernel, max(n, 1) * parts, out, topk_idx, topk_weights, heap.data_ptrs, heap.signal_ptrs,
           seq, counter, status, wait_stats if wait_stats is not None else counter, _mask(mask, status), rank, n,
           num_ranks, num_local_experts, num_local_experts * num_ranks, k, T, H, layout.combine_area,
           layout.combine_flag_word, timeout_ns, parts, HAS_WAIT=wait_stats is not None, SHRINK=mask is not None,
           BK=_pow2(k), BH=BH, num_warps=4, **NO_FMA)


def _mask(mask, placeholder):
    return mask if mask is not None else placeholder


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))
