"""Routing layout on the device, and the count exchange that precedes every dispatch.

Two launches replace :func:`tritonep.layout.compute_layout` (the torch reference, same outputs)
for the symmetric backend, then a gather of what the peers announced: its own launch, or (one
launch fewer) the end of the count kernel's last program (``count(gather_into=...)``: a synced
dispatch of plain rows) or of the row push's program 0 (``tritonep.kernels.dispatch.push``: no
host sync):

1. ``count`` (programs loop over blocks of ``BT`` tokens): per block and destination rank, how many
   tokens go there (``block_counts`` ``[num_blocks, R]``); per rank the token count and per local
   expert the (token, slot) count, and the input checks (largest expert id, duplicate flag), added
   atomically into a scratch of the buffer that is zero between dispatches. The last program to
   finish turns the block counts into ``block_base`` (each block's first slot on each rank), moves
   the scratch into ``send_counts`` ``[R, 1 + L]`` and zeroes it, waits until every peer has
   released its buffer (``freed == prev_seq``), writes row ``d`` of ``send_counts`` and the checks
   into peer ``d``'s signal area and raises ``notified = seq`` there. It can also copy
   ``topk_idx`` for the handle on the way (one torch launch fewer per dispatch).
2. ``slots``: each block adds its running count to ``block_base`` and writes
   ``dst_buffer_slot_idx`` and ``combine_slot_idx`` (``[n, k]`` int32; meaning in
   :mod:`tritonep.layout`). Needs nothing from the peers. The tiled row push computes the same
   positions itself (:func:`place`) and writes them, so plain-row dispatches skip this launch.
3. ``expert_ranks`` (expand mode): for each slot, how many earlier rows of this rank select the
   same expert (:func:`tritonep.layout.expert_ranks`, the torch reference): per block of tokens and
   chunk of experts, one program counts its block's hits on its chunk; a second launch adds the
   counts of the earlier blocks to a running count within the block (one launch when every token
   fits one block). Needs nothing from the peers.
4. ``gather`` (one program, :func:`gather_counts`): waits for ``notified == seq`` from every peer and writes ``info``:
   ``[psum over sources (R) | per-local-expert counts (L) | each source's largest id (R) |
   each source's duplicate flag (R) | per-local-expert prefix of the aligned counts (L) |
   expand mode: base table (R x L)]``.

Invalid ids (``>= num_experts``) count as empty slots here, so a bad input can never address a
rank that does not exist; the host reads the checks with the counts and raises on every rank.

Worked example (R=2, E=4, L=2, this rank 1, ``topk_idx = [[3, 0], [1, -1], [2, 3]]``): token 0
goes to ranks 1 and 0, token 1 to rank 0, token 2 to rank 1, so ``send_counts = [[2, 1, 1],
[2, 1, 2]]`` and (one block) ``block_counts = [[2, 2]]``; slots: token 0 is slot 0 on both ranks,
token 1 slot 1 on rank 0, token 2 slot 1 on rank 1.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import block_size, cdiv
from .launch import launch
from .primitives import (OP_DISPATCH_RECV, OP_DISPATCH_SEND, announce_rows, arrive, device_fn, int32_ptr, op_seq,
                         poisoned, record_timeout, signal_all, wait_peers, wait_words_timed)
from .tiles import routes

#: tokens per block of the layout kernels
BLOCK_TOKENS = 64


@device_fn
def presence(dest, num_ranks, BR: tl.constexpr):
    """``[BT, BR]`` int32: 1 where the token goes to rank ``d`` (any of its slots)."""
    offs_r = tl.arange(0, BR)
    hit = tl.expand_dims(dest, 2) == tl.expand_dims(tl.expand_dims(offs_r, 0), 0)
    return tl.max(hit.to(tl.int32), axis=1) * tl.expand_dims((offs_r < num_ranks).to(tl.int32), 0)


@device_fn
def place(ids, valid, dest, base, rank, num_ranks, T, BK: tl.constexpr, BR: tl.constexpr):
    """Positions of a block of tokens (``ids``/``valid``/``dest`` from :func:`routes`) whose first
    rows for each rank go to slots ``base`` (``[BR]``). Returns ``slot_of_rank`` ``[BT, BR]`` (the
    token's slot on each rank it goes to), ``dst_slot`` and ``cslot`` ``[BT, BK]``
    (``dst_buffer_slot_idx`` and ``combine_slot_idx``, meaning in :mod:`tritonep.layout`)."""
    offs_k = tl.arange(0, BK)
    offs_r = tl.arange(0, BR)
    slot_of_rank = tl.expand_dims(base, 0) + tl.cumsum(presence(dest, num_ranks, BR), axis=0) - 1  # [BT, BR]
    # slot s represents its rank when no later slot goes to the same rank
    k_row = tl.expand_dims(tl.expand_dims(offs_k, 0), 0)  # [1, 1, BK]: the other slot s2
    k_col = tl.expand_dims(tl.expand_dims(offs_k, 0), 2)  # [1, BK, 1]: this slot s
    same = (tl.expand_dims(dest, 2) == tl.expand_dims(dest, 1)) & tl.expand_dims(valid, 1)  # [BT, s, s2]
    later = tl.max((same & (k_row > k_col)).to(tl.int32), axis=2)
    rep = valid & (later == 0)
    hit = tl.expand_dims(dest, 2) == tl.expand_dims(tl.expand_dims(offs_r, 0), 0)  # [BT, BK, BR]
    slot = tl.sum(tl.where(hit, tl.expand_dims(slot_of_rank, 1), 0), axis=2)
    # j = ranks whose highest slot comes before this slot's rank's highest slot
    smax = tl.max(tl.where(same, k_row, -1), axis=2)  # [BT, BK]
    j = tl.sum((tl.expand_dims(rep, 1) & (k_row < tl.expand_dims(smax, 2))).to(tl.int32), axis=2)
    return slot_of_rank, tl.where(rep, rank * T + slot, -1), tl.where(valid, j, -1)


@triton.jit(do_not_specialize=["n"])
def _layout_count_kernel(
    topk_ptr, topk_copy_ptr, block_counts_ptr, block_base_ptr, acc_ptr, send_counts_ptr, signal_ptrs, counter_ptr,
    status_ptr, n, num_topk, num_experts, num_local_experts, rank, num_ranks, seq_ptr,
    counts_word, count_stride, notified_word, freed_word, timeout_ns,
    info_ptr, host_ptr, wait_ptr, alignment,
    COPY: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, CH: tl.constexpr,
    GATHER: tl.constexpr, EXPAND: tl.constexpr, TO_HOST: tl.constexpr, BL: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_r = tl.arange(0, BR)
    mr = offs_r < num_ranks
    offs_k = tl.arange(0, BK)
    stride = num_local_experts + 1
    check_ptr = acc_ptr + num_ranks * stride
    for b in range(pid, tl.cdiv(n, BT), nprog):
        t = b * BT + tl.arange(0, BT)
        mt = t < n
        ids, valid, dest = routes(topk_ptr, t, mt, num_topk, num_experts, num_local_experts, num_ranks, BK)
        if COPY:  # the handle's copy of topk_idx, bit for bit (invalid ids included)
            m2 = tl.expand_dims(mt, 1) & tl.expand_dims(offs_k < num_topk, 0)
            tl.store(topk_copy_ptr + tl.expand_dims(t.to(tl.int64) * num_topk, 1) + tl.expand_dims(offs_k, 0), ids,
                     mask=m2)
        cnt = tl.sum(presence(dest, num_ranks, BR), axis=0)
        tl.store(block_counts_ptr + b * num_ranks + offs_r, cnt, mask=mr)
        tl.atomic_add(acc_ptr + offs_r * stride, cnt, mask=mr, sem="relaxed")
        # expert e is column 1 + e % L of row e // L
        tl.atomic_add(acc_ptr + ids + ids // num_local_experts + 1, 1, mask=valid, sem="relaxed")
        hi = tl.max(tl.minimum(ids, 2**31 - 1)).to(tl.int32)
        same = (tl.expand_dims(ids, 2) == tl.expand_dims(ids, 1)) & tl.expand_dims(valid, 2) \
            & tl.expand_dims(tl.expand_dims(offs_k, 0) != tl.expand_dims(offs_k, 1), 0)
        dup = tl.max(tl.max(tl.max(same.to(tl.int32), axis=2), axis=1))
        tl.atomic_max(check_ptr, hi, sem="relaxed")
        tl.atomic_max(check_ptr + 1, dup, sem="relaxed")

    if arrive(counter_ptr, nprog):
        # exclusive prefix of the block counts: block b's first slot on each rank
        carry = tl.zeros([BR], dtype=tl.int32)
        for c in range(0, tl.cdiv(n, BT), CH):
            rows = c + tl.arange(0, CH)
            m = tl.expand_dims(rows < tl.cdiv(n, BT), 1) & tl.expand_dims(mr, 0)
            at = tl.expand_dims(rows * num_ranks, 1) + tl.expand_dims(offs_r, 0)
            v = tl.load(block_counts_ptr + at, mask=m, other=0, volatile=True)
            tl.store(block_base_ptr + at, tl.cumsum(v, axis=0) - v + tl.expand_dims(carry, 0), mask=m)
            carry += tl.sum(v, axis=0)
        # the accumulators (a scratch that stays zero between dispatches) into send_counts and this
        # program's registers, then back to zero; volatile: other programs' atomics wrote them
        offs_c = tl.arange(0, BC)
        mc = offs_c < stride
        checks = tl.load(check_ptr + tl.arange(0, 2), volatile=True)
        tl.store(check_ptr + tl.arange(0, 2), tl.zeros([2], dtype=tl.int32))
        for d in range(num_ranks):
            row = tl.load(acc_ptr + d * stride + offs_c, mask=mc, volatile=True)
            tl.store(send_counts_ptr + d * stride + offs_c, row, mask=mc)
            tl.store(acc_ptr + d * stride + offs_c, tl.zeros([BC], dtype=tl.int32), mask=mc)
        seq, prev_seq = op_seq(seq_ptr)
        ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns,
                        OP_DISPATCH_SEND, seq, BR)
        if ok:
            for d in range(num_ranks):
                row = tl.load(send_counts_ptr + d * stride + offs_c, mask=mc)
                peer = tl.load(signal_ptrs + d) + (counts_word + rank * count_stride).to(tl.int64) * 4
                tl.store(int32_ptr(peer + offs_c * 4), row, mask=mc)
                tl.store(int32_ptr(peer + (count_stride - 2 + tl.arange(0, 2)) * 4), checks)
            signal_all(signal_ptrs, num_ranks, notified_word + rank, seq, BR)
        if GATHER:
            # the gather in this program, one launch fewer (a timeout above poisoned the buffer:
            # then it waits for nothing and hands the host the status words)
            gather_counts(signal_ptrs, status_ptr, info_ptr, host_ptr, wait_ptr, rank, num_ranks, seq,
                           num_local_experts, counts_word, count_stride, notified_word, timeout_ns, alignment, 0, 0,
                           0, EXPAND, TO_HOST, False, BR, BL)


@triton.jit(do_not_specialize=["n"])
def _layout_slots_kernel(
    topk_ptr, block_base_ptr, dst_slot_ptr, cslot_ptr, n, num_topk, num_experts, num_local_experts, rank,
    num_ranks, T,
    BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_r = tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    for b in range(pid, tl.cdiv(n, BT), nprog):
        base = tl.load(block_base_ptr + b * num_ranks + offs_r, mask=offs_r < num_ranks, other=0)
        t = b * BT + tl.arange(0, BT)
        mt = t < n
        ids, valid, dest = routes(topk_ptr, t, mt, num_topk, num_experts, num_local_experts, num_ranks, BK)
        _, dst_slot, cslot = place(ids, valid, dest, base, rank, num_ranks, T, BK, BR)
        m2 = tl.expand_dims(mt, 1) & tl.expand_dims(offs_k < num_topk, 0)
        out = tl.expand_dims(t.to(tl.int64) * num_topk, 1) + tl.expand_dims(offs_k, 0)
        tl.store(dst_slot_ptr + out, dst_slot, mask=m2)
        tl.store(cslot_ptr + out, cslot, mask=m2)


@device_fn
def gather_counts(signal_ptrs, status_ptr, out_ptr, host_ptr, wait_ptr, rank, num_ranks, seq, num_local_experts,
                   counts_word, count_stride, notified_word, timeout_ns, alignment, cap, over_word, announced_word,
                   EXPAND: tl.constexpr, TO_HOST: tl.constexpr, CAPPED: tl.constexpr, BR: tl.constexpr,
                   BL: tl.constexpr):
    """The gather (one program): wait for every peer's counts of operation ``seq``, then fill ``out``
    (see :func:`gather`), and with ``TO_HOST`` copy what the host reads to ``host_ptr``."""
    my_sig = tl.load(signal_ptrs + rank)
    offs_r = tl.arange(0, BR)
    mr = offs_r < num_ranks
    # the peers' counts, and how long each one kept this rank waiting (wait_ptr: int64 [R + 1],
    # the sum per peer, then the number of gathers: a late or slow rank shows as the largest)
    late, waited = wait_words_timed(int32_ptr(my_sig + (notified_word + offs_r).to(tl.int64) * 4), mr, seq,
                                    timeout_ns, poisoned(status_ptr))
    record_timeout(status_ptr, late, OP_DISPATCH_RECV, seq)
    tl.atomic_add(wait_ptr + offs_r, waited, mask=mr, sem="relaxed", scope="gpu")
    tl.atomic_add(wait_ptr + num_ranks + offs_r, (offs_r == 0).to(tl.int64), mask=offs_r == 0, sem="relaxed",
                  scope="gpu")
    src = my_sig + (counts_word + offs_r * count_stride).to(tl.int64) * 4
    # volatile: peers wrote these over NVLink after this SM may have cached the lines
    cnt = tl.load(int32_ptr(src), mask=mr, other=0, volatile=True)
    tl.store(out_ptr + offs_r, tl.cumsum(cnt, 0), mask=mr)
    chk = num_ranks + num_local_experts
    for c in range(2):
        v = tl.load(int32_ptr(src + (count_stride - 2 + c) * 4), mask=mr, other=0, volatile=True)
        tl.store(out_ptr + chk + c * num_ranks + offs_r, v, mask=mr)
    offs_l = tl.arange(0, BL)
    ml = offs_l < num_local_experts
    acc = tl.zeros([BL], dtype=tl.int32)
    for s in range(num_ranks):
        word = counts_word + s * count_stride + 1 + offs_l
        acc += tl.load(int32_ptr(my_sig + word.to(tl.int64) * 4), mask=ml, other=0, volatile=True)
    tl.store(out_ptr + num_ranks + offs_l, acc, mask=ml)
    # psum_num_recv_tokens_per_expert (spec 2.5): inclusive prefix of the aligned counts; in expand
    # mode the end of each expert's rows instead (its aligned start + its count)
    aligned = (acc + alignment - 1) // alignment * alignment
    prefix = tl.cumsum(aligned, 0)
    if EXPAND:
        prefix = prefix - aligned + acc
    tl.store(out_ptr + chk + 2 * num_ranks + offs_l, prefix, mask=ml)
    if CAPPED:
        # outputs of ``cap`` rows: tell every rank whether this one's rows fit (primitives.announce_rows)
        if EXPAND:
            need = tl.sum(tl.where(ml, aligned, 0))
        else:
            need = tl.sum(cnt)
        tl.debug_barrier()
        announce_rows(signal_ptrs, status_ptr, num_ranks, rank, over_word, announced_word, need, cap, seq, BR)
    if TO_HOST:
        # what the host reads, straight into its pinned memory: psums, per-expert counts, checks,
        # then the status words (after every wait above, so a timeout of this dispatch shows)
        tl.debug_barrier()
        host_words = chk + 2 * num_ranks
        for c in range(0, host_words, BL):
            offs = c + offs_l
            tl.store(host_ptr + offs, tl.load(out_ptr + offs, mask=offs < host_words, volatile=True),
                     mask=offs < host_words)
        offs4 = tl.arange(0, 4)
        tl.store(host_ptr + host_words + offs4, tl.atomic_add(status_ptr + offs4, 0, sem="relaxed", scope="gpu"))
        # then the counter the host polls (status.CountWords), raised after every word above; this
        # kernel is its only writer, and the host reads it, so a load and a release store suffice
        done = tl.load(host_ptr + host_words + 4, volatile=True)
        tl.debug_barrier()
        tl.atomic_xchg(host_ptr + host_words + 4, done + 1, sem="release", scope="sys")
    if EXPAND:
        # base[s][i] = first expanded row of source s's tokens for local expert i: the aligned start
        # of expert i's segment plus what earlier sources sent to it
        running = tl.cumsum(aligned, 0) - aligned
        table = chk + 2 * num_ranks + num_local_experts
        for s in range(num_ranks):
            tl.store(out_ptr + table + s * num_local_experts + offs_l, running, mask=ml)
            word = counts_word + s * count_stride + 1 + offs_l
            running += tl.load(int32_ptr(my_sig + word.to(tl.int64) * 4), mask=ml, other=0, volatile=True)


@triton.jit
def _layout_gather_kernel(
    signal_ptrs, status_ptr, out_ptr, host_ptr, wait_ptr, rank, num_ranks, seq_ptr, num_local_experts, counts_word,
    count_stride, notified_word, timeout_ns, alignment, cap, over_word, announced_word,
    EXPAND: tl.constexpr, TO_HOST: tl.constexpr, CAPPED: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):
    seq, _ = op_seq(seq_ptr)
    gather_counts(signal_ptrs, status_ptr, out_ptr, host_ptr, wait_ptr, rank, num_ranks, seq, num_local_experts,
                   counts_word, count_stride, notified_word, timeout_ns, alignment, cap, over_word, announced_word,
                   EXPAND, TO_HOST, CAPPED, BR, BL)


@device_fn
def _expert_hits(topk_ptr, block, chunk, n, k, num_experts, BT: tl.constexpr, BK: tl.constexpr,
                 BE: tl.constexpr):
    """Slots of token block ``block`` (flat, ``[BT * BK]``: token ``s // BK``, column ``s % BK``)
    against the experts of chunk ``chunk``: ``(hit [BT * BK, BE], slot offsets, in range, valid)``."""
    offs_s = tl.arange(0, BT * BK)
    t = block * BT + offs_s // BK
    col = offs_s % BK
    m = (t < n) & (col < k)
    where = t.to(tl.int64) * k + col
    e = tl.load(topk_ptr + where, mask=m, other=-1).to(tl.int64)
    valid = m & (e >= 0) & (e < num_experts)
    offs_e = chunk * BE + tl.arange(0, BE)
    hit = (tl.expand_dims(e, 1) == tl.expand_dims(offs_e, 0)) & tl.expand_dims(valid, 1)
    return hit, where, m, valid


@triton.jit(do_not_specialize=["n"])
def _expert_block_counts_kernel(topk_ptr, counts_ptr, n, k, num_experts, num_chunks, BT: tl.constexpr,
                                BK: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    block, chunk = pid // num_chunks, pid % num_chunks
    hit, _, _, _ = _expert_hits(topk_ptr, block, chunk, n, k, num_experts, BT, BK, BE)
    offs_e = chunk * BE + tl.arange(0, BE)
    tl.store(counts_ptr + block * num_experts + offs_e, tl.sum(hit.to(tl.int32), axis=0), mask=offs_e < num_experts)


@triton.jit(do_not_specialize=["n"])
def _expert_rank_kernel(topk_ptr, counts_ptr, out_ptr, n, k, num_experts, num_chunks, BT: tl.constexpr,
                        BK: tl.constexpr, BE: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0)
    block, chunk = pid // num_chunks, pid % num_chunks
    hit, where, m, valid = _expert_hits(topk_ptr, block, chunk, n, k, num_experts, BT, BK, BE)
    offs_e = chunk * BE + tl.arange(0, BE)
    base = tl.zeros([BE], dtype=tl.int32)
    if NB > 1:  # what the earlier blocks sent to each expert of the chunk
        offs_b = tl.arange(0, NB)
        earlier = tl.expand_dims(offs_b < block, 1) & tl.expand_dims(offs_e < num_experts, 0)
        table = tl.load(counts_ptr + tl.expand_dims(offs_b, 1) * num_experts + tl.expand_dims(offs_e, 0),
                        mask=earlier, other=0)
        base = tl.sum(table, axis=0)
    h = hit.to(tl.int32)
    rank = tl.sum(tl.where(hit, tl.cumsum(h, axis=0) - 1 + tl.expand_dims(base, 0), 0), axis=1)
    # each valid slot's expert is in one chunk: that program writes it; chunk 0 writes the empty ones
    mine = tl.max(h, axis=1) > 0
    first = (rank * 0 + chunk) == 0  # (a vector: the interpreter takes no scalar in a mask)
    tl.store(out_ptr + where, tl.where(mine, rank, -1), mask=m & (mine | (first & ~valid)))


#: slots (tokens x top-k columns, padded) per program of the expert-rank kernels, and experts per chunk
_RANK_SLOTS, _RANK_EXPERTS = 512, 32


def expert_rank_words(n: int, k: int, num_experts: int) -> int:
    """int32 words of the per-block counts that :func:`expert_ranks` takes (0: one block, none)."""
    blocks = cdiv(n, max(1, _RANK_SLOTS // block_size(k)))
    return blocks * num_experts if blocks > 1 else 0


def expert_ranks(*, topk_idx, num_experts, out, counts):
    """Launch the expert-rank kernels: ``out`` ``[n, k]`` int32 gets, for each slot, how many earlier
    rows select the same expert, -1 where empty or invalid (:func:`tritonep.layout.expert_ranks`);
    ``counts``: :func:`expert_rank_words` int32 words of scratch (any tensor when that is 0)."""
    n, k = topk_idx.shape
    if n == 0:
        return
    BK = block_size(k)
    BT = max(1, _RANK_SLOTS // BK)
    BE = min(_RANK_EXPERTS, block_size(num_experts))
    blocks, chunks = cdiv(n, BT), cdiv(num_experts, BE)
    if blocks > 1:
        launch(_expert_block_counts_kernel, blocks * chunks, topk_idx, counts, n, k, num_experts, chunks,
               BT=BT, BK=BK, BE=BE)
    launch(_expert_rank_kernel, blocks * chunks, topk_idx, counts, out, n, k, num_experts, chunks,
           BT=BT, BK=BK, BE=BE, NB=block_size(blocks) if blocks > 1 else 1)


def info_size(num_ranks: int, num_local_experts: int, expand: bool) -> int:
    """int32 words of the ``info`` tensor that :func:`gather` fills."""
    return 3 * num_ranks + 2 * num_local_experts + (num_ranks * num_local_experts if expand else 0)


def scratch_size(num_ranks: int, num_local_experts: int) -> int:
    """int32 words of the accumulators that :func:`count` takes (zero, and left zero)."""
    return num_ranks * (1 + num_local_experts) + 2


def count(*, topk_idx, topk_copy, block_counts, block_base, scratch, send_counts, signal_ptrs, counter, status,
          num_experts, rank, num_ranks, seq_ptr, counts_word, count_stride, notified_word, freed_word, timeout_ns,
          num_programs, block_tokens, gather_into=None):
    """Launch the count + notify kernel for blocks of ``block_tokens`` tokens. ``scratch``: at least
    :func:`scratch_size` int32 words, zero (the kernel adds into them, then zeroes them again);
    ``send_counts`` ``[R, 1 + L]`` int32 (written); ``block_counts`` and ``block_base``
    ``[cdiv(n, block_tokens), R]`` int32 (``block_base``: each block's first slot on each rank);
    ``topk_copy``: None, or ``[n, k]`` like ``topk_idx`` to receive a copy of it. ``gather_into``:
    None, or the arguments of :func:`gather` that differ from this call's (``out``, ``wait_ns``,
    ``alignment``, ``expand``, ``host_out``; no ``cap``): the program that notifies the peers then
    gathers their counts, as a :func:`gather` launched next would (one launch fewer)."""
    n, k = topk_idx.shape
    L = num_experts // num_ranks
    grid = max(1, min(num_programs, cdiv(n, block_tokens)))
    g = gather_into or {}
    info, host = g.get("out", scratch), g.get("host_out")
    launch(_layout_count_kernel, grid,
        topk_idx, topk_copy if topk_copy is not None else topk_idx, block_counts, block_base, scratch, send_counts,
        signal_ptrs, counter, status, n, k, num_experts, L,
        rank, num_ranks, seq_ptr, counts_word, count_stride, notified_word, freed_word, timeout_ns,
        info, host if host is not None else info, g.get("wait_ns", scratch), g.get("alignment", 1),
        COPY=topk_copy is not None, BT=block_tokens, BK=block_size(k), BR=block_size(num_ranks), BC=block_size(L + 1),
        CH=128, GATHER=gather_into is not None, EXPAND=bool(g.get("expand", False)), TO_HOST=host is not None,
        BL=block_size(L))


def slots(*, topk_idx, block_base, dst_buffer_slot_idx, combine_slot_idx, num_experts, rank, num_ranks, T,
          num_programs):
    """Launch the slots kernel (after :func:`count` filled ``block_base`` for ``BLOCK_TOKENS``)."""
    n, k = topk_idx.shape
    if n == 0:
        return
    grid = max(1, min(num_programs, cdiv(n, BLOCK_TOKENS)))
    launch(_layout_slots_kernel, grid,
        topk_idx, block_base, dst_buffer_slot_idx, combine_slot_idx, n, k, num_experts, num_experts // num_ranks,
        rank, num_ranks, T, BT=BLOCK_TOKENS, BK=block_size(k), BR=block_size(num_ranks))


def gather(*, signal_ptrs, status, out, wait_ns, rank, num_ranks, seq_ptr, num_local_experts, counts_word,
           count_stride, notified_word, timeout_ns, alignment=1, expand=False, host_out=None, cap=None,
           over_word=0, announced_word=0):
    """Launch the gather kernel: ``out`` int32 of :func:`info_size` words; ``alignment``: of each
    local expert's rows (``expert_alignment``), for the per-expert prefix and the expand table.
    ``host_out``: None, or host memory the device can write (pinned), ``3 * R + L + 5`` int32
    words: ``out``'s first ``3 * R + L`` words, then the 4 status words, then a counter the kernel
    raises by one once those are written (:class:`tritonep.status.CountWords`). ``wait_ns``: int64
    ``[R + 1]``, the buffer's wait statistics (each peer's summed wait in ns, then the count).
    ``cap``: the outputs' rows when fewer than the worst case (else None): the kernel announces
    whether this rank's rows fit (``primitives.announce_rows``)."""
    assert status.numel() >= 4
    launch(_layout_gather_kernel, 1,
        signal_ptrs, status, out, host_out if host_out is not None else out, wait_ns, rank, num_ranks, seq_ptr,
        num_local_experts, counts_word, count_stride, notified_word, timeout_ns, alignment,
        cap if cap is not None else 0, over_word, announced_word, EXPAND=expand,
        TO_HOST=host_out is not None, CAPPED=cap is not None, BR=block_size(num_ranks), BL=block_size(num_local_experts))


__all__ = ["BLOCK_TOKENS", "count", "slots", "gather", "gather_counts", "expert_ranks", "expert_rank_words", "info_size", "presence",
           "place"]
