"""The dense combine: each peer's rows for this rank land as one dense block, ``[R, T, hidden]``
by sender (:func:`dense_area`), so the GPU's copy engine can send a peer's rows with a few large
copies (0 SMs) while every program here reduces tiles of tokens as soon as their rows are in.

The default combine of plain rows at 2 ranks when a rank may send ``KernelConfig.copy_engine_min_bytes``
or more, and of every group above 2 ranks (``KernelConfig.combine_by_copy_engine``): there SMs send into
the same layout (:func:`_push_chunks`, half of the programs), as does a rank whose dispatch did not
sync (its host does not know the counts the copies need). The backend queues the copies
(``tritonep/backends/symmetric/combine.py``).

Flags: ``flags[sender][c] = -1`` (signal word ``flags_word + sender * flag_blocks + c``) once the
sender's rows ``c * FLAG_ROWS ...`` are here. Worked example (R=2, T=4, FLAG_ROWS=64): rank 1 sent
rank 0 three rows; they lie at ``[1, 0:3, :]`` of rank 0's area and ``flags[1][0] = -1`` raises
once all three are there; rank 0's reduction of a token reads its own partial from ``x`` and rank
1's from row ``slot`` of ``[1]``.

Shapes as :mod:`.combine`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import block_size
from .combine import _bias_pair, _reduce_tile, _wait_rows, reduce_channels, weights_mode
from .launch import launch
from ..recording import Offset
from .primitives import OP_COMBINE_RECV, device_fn, finish_pipelined, int32_ptr, op_seq, poisoned, record_timeout
from .tiles import copy_tile_rows, senders

#: rows per flag of the dense layout (a reduction step of at most 64 tokens then waits for at most
#: two flags per peer; an SM sender has one work item per block and peer)
FLAG_ROWS = 64


def dense_area(num_ranks: int, T: int, hidden: int, num_topk: int) -> tuple[int, int]:
    """Receive area of the dense combine: ``[R, T, hidden]`` bf16 rows (rank ``r``'s rows for this
    rank, in its slot order), then ``[R, T, k]`` float32 weights. Returns ``(weights byte offset,
    total bytes)``."""
    w_off = -(-num_ranks * T * hidden * 2 // 16) * 16
    return w_off, w_off + num_ranks * T * num_topk * 4


def chunk_rows(T: int) -> int:
    """Rows per copy of the copy-engine combine (a multiple of :data:`FLAG_ROWS`; one flag copy
    raises all of its flags): about an eighth of the largest region (the reduction then trails the
    last copy by an eighth of its work), at least 256 rows (each copy has a fixed cost of a few
    microseconds)."""
    return max(256, -(-T // 8 // FLAG_ROWS) * FLAG_ROWS)


def chunk_bounds(count: int, chunk: int) -> list[tuple[int, int]]:
    """``(first row, rows)`` of each copy of a region of ``count`` rows: chunks of ``chunk`` rows (a
    multiple of :data:`FLAG_ROWS`, so that no flag block is shared by two copies)."""
    return [(r0, min(chunk, count - r0)) for r0 in range(0, count, chunk)]


@device_fn
def _push_chunks(pid, nprog, x_ptr, w_ptr, psum_ptr, heap_ptr, data_ptrs, signal_ptrs, skip, rank, num_ranks, T,
                 x_words, num_topk, w_base, block_rows, flags_word, flag_blocks, HAS_WEIGHTS: tl.constexpr,
                 BT: tl.constexpr, BW: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """What the copy engine would send, done by programs ``pid, pid + nprog, ...``: rows received
    from each peer ``s`` to ``s``'s :func:`dense_area`, one work item per block of ``block_rows``
    rows and peer, each raising its block's flag in ``s``'s signal area. Each step loads its rows'
    next ``BW`` words before it stores the current ones."""
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
                copy_tile_rows(src, dst, on, x_words, BW, True)
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
def _dense_reduce_kernel(
    out_ptr, out_w_ptr, b0_ptr, b1_ptr, x_off, w_ptr, psum_ptr, topk_ptr, dst_slot_ptr, cslot_ptr,
    heap_ptr, heap_w_ptr, heap_words_ptr, x_words_ptr, data_ptrs, signal_ptrs, counter_ptr, status_ptr,
    rank, num_ranks, seq_ptr, n, num_topk, num_experts, num_local_experts, hidden, T, x_words, w_base, block_rows,
    flags_word, flag_blocks, ready_word, freed_word, timeout_ns, senders,
    NUM_BIAS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, NJ: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BTP: tl.constexpr, BW: tl.constexpr, SEND: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq, _ = op_seq(seq_ptr)
    skip = poisoned(status_ptr)
    local_base = tl.load(psum_ptr + rank - 1, mask=rank > 0, other=0)
    offs_r = tl.arange(0, BR)
    my_flags = tl.load(signal_ptrs + rank) + flags_word * 4
    flags = my_flags + (offs_r * flag_blocks).to(tl.int64) * 4
    # a rank whose rows do not go by copy engine sends with its first programs (queued after
    # ``enter``); a reduction alone compiles without the senders' code (fewer registers)
    if SEND and pid < senders:
        _push_chunks(pid, senders, x_words_ptr, w_ptr, psum_ptr, heap_words_ptr, data_ptrs, signal_ptrs, skip, rank,
                     num_ranks, T, x_words, num_topk, w_base, block_rows, flags_word, flag_blocks, HAS_WEIGHTS, BTP,
                     BW, BR, BK)
    # (a buffer that stopped reads nothing: x may hold fewer rows than the counts, after an overflow)
    reducer = (pid >= senders) & (skip == 0)
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
                     timeout_ns, OP_COMBINE_RECV, my_flags, num_ranks * flag_blocks, BR)


def dense_reduce_tile(tile, num_ranks: int, num_topk: int) -> tuple[int, int, int]:
    """``KernelConfig.combine_dense_reduce_tile`` with 0 channels replaced by a quarter of
    :func:`reduce_channels` (at least 64): as many elements in flight as a 16-token step of the
    slot combine's reduction."""
    bt, bh, warps = tile
    return bt, bh or max(64, reduce_channels(num_ranks, num_topk) // 4), warps


def reduce_dense(*, out, out_weights, bias, x, topk_weights, psum, topk_idx, dst_buffer_slot_idx, combine_slot_idx,
                 num_experts, heap, data_ptrs, signal_ptrs, counter, status, rank, num_ranks, seq_ptr, T, flags_word,
                 flag_blocks, ready_word, freed_word, timeout_ns, num_programs, tile, send_tile, sender_share,
                 send: bool = False, sum_weights: bool = False):
    """The reduction of the dense combine: every peer copies its rows for this rank to
    :func:`dense_area` and raises ``flags[peer][c] = -1`` once rows ``c * FLAG_ROWS ...`` are
    there; steps of ``tile`` (:func:`dense_reduce_tile`) tokens are reduced as soon as the flags of
    their rows are up (``combine._wait_rows``), this rank's own partials read from ``x``. The last
    program zeroes the flags, waits for every peer's ``ready == seq`` (raised by
    :func:`tritonep.kernels.primitives.enter`) and raises ``freed = seq``. Outputs as
    ``combine.reduce``.

    ``send``: this rank's rows go by SMs instead of the copy engine (same rows, layout and flags):
    ``sender_share`` of the programs send, in steps of ``send_tile`` (rows, 4-byte words; the
    launch's warps are the reduction's), the rest reduce. Queued after
    :func:`tritonep.kernels.primitives.enter`, which waited for the peers' ``freed``."""
    n, k = combine_slot_idx.shape
    H = out.shape[1]
    w_off, _ = dense_area(num_ranks, T, H, k)
    bt, bh, warps = dense_reduce_tile(tile, num_ranks, k)
    assert bt <= FLAG_ROWS  # a step's rows from one peer then span at most two flag blocks
    assert not send or num_programs >= 2
    b0, b1 = _bias_pair(bias, out)
    btp, bw = send_tile
    launch(_dense_reduce_kernel, num_programs,
           out, out_weights if out_weights is not None else status, b0, b1, Offset.between(x, heap, 2),
           topk_weights if topk_weights is not None else status, psum, topk_idx, dst_buffer_slot_idx,
           combine_slot_idx, heap.view(torch.bfloat16), heap.view(torch.float32), heap.view(torch.int32),
           x.view(torch.int32), data_ptrs, signal_ptrs, counter, status,
           rank, num_ranks, seq_ptr, n, k, num_experts, num_experts // num_ranks, H, T, H // 2, w_off // 4, FLAG_ROWS,
           flags_word, flag_blocks, ready_word, freed_word, timeout_ns,
           senders(num_programs, sender_share) if send else 0,
           NUM_BIAS=len(bias), HAS_WEIGHTS=weights_mode(out_weights, sum_weights), NJ=min(num_ranks, k), BT=bt, BH=bh,
           BR=block_size(num_ranks), BK=block_size(k), BTP=btp, BW=bw, SEND=send, num_warps=warps)


__all__ = ["FLAG_ROWS", "dense_area", "chunk_rows", "chunk_bounds", "dense_reduce_tile", "reduce_dense"]
