"""The symmetric backend's combine: :func:`route` picks one of four, :func:`combine` runs it.

* ``"dense_ce"`` / ``"dense_sm"`` (:mod:`tritonep.kernels.combine_dense`): each peer's rows land as
  one dense block by sender; the copy engine sends them (``dense_ce``: ranks whose host knows the
  counts, in groups where ``KernelConfig.combine_by_copy_engine``, when a rank may send
  ``KernelConfig.copy_engine_min_bytes`` or more) or half of the SMs do (``dense_sm``), while the other
  programs reduce tiles of tokens as their rows arrive.
* ``"pipelined"`` (:mod:`tritonep.kernels.combine`): rows into combine slots, push and reduction in
  one launch (small combines of two ranks).
* ``"two_launch"``: the same as a push launch, then a reduction launch (one program, one rank, or
  a buffer whose flags were not sized: built without ``num_max_tokens_per_rank``).
* ``"expand"`` (:mod:`tritonep.kernels.combine_expand`): expanded handles.

Every rank must choose alike (each rank's reduction reads the layout its peers write), so only
what every rank knows counts (the config, the sizes), never this rank's host counts, except for
who sends into the dense layout.
"""
from __future__ import annotations

import torch

from ... import copy_engine
from ... import sizing
from ...kernels import combine as slot_kernels
from ...kernels import combine_dense as dense_kernels
from ...kernels import combine_expand as expand_kernels
from ...kernels import primitives
from ..base import CombineArgs


def route(b, T: int, H: int, k: int, programs: int, expand: bool, host_knows_counts: bool) -> str:
    """Which combine runs (see the module docstring) for a handle of ``T`` tokens per rank, hidden
    ``H``, top-``k``; ``host_knows_counts``: the handle's dispatch synced with the CPU."""
    R = b.num_ranks
    if expand:
        return "expand"
    cfg = b.config
    if programs >= 2 and R >= 2 and b.flag_rows >= T and dense_kernels.dense_area(R, T, H, k)[1] <= b.num_bytes:
        if not cfg.combine_by_copy_engine:
            return "dense_sm"
        if 0 <= cfg.copy_engine_min_bytes <= (R - 1) * T * H * 2:
            return "dense_ce" if host_knows_counts else "dense_sm"
    if programs >= 2 and R > 1 and b.flag_blocks * cfg.combine_push_tile[0] >= T:
        return "pipelined"
    return "two_launch"


def combine(b, a: CombineArgs):
    """``b``: the :class:`~tritonep.backends.symmetric.core.SymmetricBackend`. Returns
    ``(out [n, H] bf16, out_weights [n, k] float32 or None)``."""
    n, k = a.topk_idx.shape
    H = a.x.shape[1]
    programs = b.programs(a.num_sms)
    x = a.x if a.x.data_ptr() % 16 == 0 else a.x.clone()  # rows are read as 16-byte vectors
    out = torch.empty((n, H), dtype=torch.bfloat16, device=b.device)
    out_w = torch.empty((n, k), dtype=torch.float32, device=b.device) if a.topk_weights is not None else None
    which = route(b, a.num_max_tokens_per_rank, H, k, programs, a.expand, a.host_psum is not None)
    if which.startswith("dense"):
        _dense(b, a, x, out, out_w, programs, by_copy_engine=which == "dense_ce")
    elif which == "expand":
        _expand(b, a, x, out, out_w, programs)
    else:
        _slots(b, a, x, out, out_w, programs, pipelined=which == "pipelined")
    if b.device.type != "cuda":
        b.check_status()
    return out, out_w


def _slots(b, a: CombineArgs, x, out, out_w, programs: int, pipelined: bool) -> None:
    """Rows into combine slots (:mod:`tritonep.kernels.combine`), in one launch or two."""
    T = a.num_max_tokens_per_rank
    cfg = b.config
    slot_offsets = sizing.combine_slot_offsets(x.shape[1], a.topk_idx.shape[1])
    layout = a.layout
    common = dict(topk_weights=a.topk_weights, psum=a.psum, heap=b.heap.data, data_ptrs=b.heap.data_ptrs, T=T,
                  slot_offsets=slot_offsets, num_programs=programs, **b.words(), **b.common())
    reduce_args = dict(out=out, out_weights=out_w, bias=a.bias, x=x, topk_idx=a.topk_idx,
                       dst_buffer_slot_idx=layout.dst_buffer_slot_idx, combine_slot_idx=layout.combine_slot_idx,
                       num_experts=a.num_experts, sum_weights=a.sum_weights)
    if pipelined:
        if a.before_epilogue is not None:  # the reduction starts with the push: wait first
            a.before_epilogue()
        slot_kernels.pipelined(x_words=x.view(torch.int32), recv_src_metadata=a.recv_src_metadata,
                               counter=b.counter_combine_push, flags_word=b.flags_word,
                               flag_blocks=b.flag_blocks, push_tile=cfg.combine_push_tile,
                               reduce_tile_=cfg.combine_reduce_tile, sender_share=cfg.sender_share, **reduce_args,
                               **common)
        return
    slot_kernels.push(x_words=x.view(torch.int32), recv_src_metadata=a.recv_src_metadata,
                      counter=b.counter_combine_push, tile=cfg.combine_push_tile, **common)
    if a.before_epilogue is not None:
        a.before_epilogue()
    slot_kernels.reduce(counter=b.counter_combine_reduce, tile=cfg.combine_reduce_tile, **reduce_args, **common)


def _expand(b, a: CombineArgs, x, out, out_w, programs: int) -> None:
    """Expanded rows (:mod:`tritonep.kernels.combine_expand`): a push launch, then a reduction."""
    T, H = a.num_max_tokens_per_rank, x.shape[1]
    slot_offsets = sizing.combine_slot_offsets(H, a.topk_idx.shape[1])
    per_slot = not a.allow_multiple_reduction
    x_words = x.view(torch.int32)
    expand_kernels.push(
        x_words=x_words, topk_weights=a.topk_weights, recv_src_metadata=a.recv_src_metadata, psum=a.psum,
        data_ptrs=b.heap.data_ptrs, counter=b.counter_combine_push, T=T, slot_offsets=slot_offsets,
        num_programs=programs, block_words=b.block_words(x_words.shape[1]), expand=True, per_slot=per_slot,
        **b.words(), **b.common())
    if a.before_epilogue is not None:
        a.before_epilogue()
    expand_kernels.reduce(
        out=out, out_weights=out_w, bias=a.bias, combine_slot_idx=a.layout.combine_slot_idx,
        data_ptrs=b.heap.data_ptrs, counter=b.counter_combine_reduce, T=T, slot_offsets=slot_offsets,
        num_programs=programs, block_h=b.block_words(H), per_slot=per_slot, **b.words(), **b.common())


def _dense(b, a: CombineArgs, x, out, out_w, programs: int, by_copy_engine: bool) -> None:
    """The dense combine. Once every peer released its buffer (``enter``), the copy engine sends
    the rows received from each peer (and their weights) back to it, in chunks of
    ``KernelConfig.copy_engine_chunk_rows`` (0: ``combine_dense.chunk_rows(T)``) rows, each chunk followed
    by one copy that raises its flags (one per ``FLAG_ROWS`` rows) to -1; meanwhile every program
    reduces tiles of tokens as their rows arrive. On GPUs the copies run on side streams, forked
    after the enter launch and joined before this returns (so CUDA graphs capture them). Without
    ``by_copy_engine`` half of the reduction's programs send the same rows and flags instead."""
    b.enter(primitives.OP_COMBINE_SEND)
    # GPU copies run beside the reduction; on CPU ranks every launch and copy runs to its end
    concurrent = b.device.type == "cuda" and by_copy_engine
    if by_copy_engine:
        stream = torch.cuda.current_stream(b.device).cuda_stream if concurrent else None
        _send_weights(b, a, stream)
    fork = b.fork() if concurrent else None
    if a.before_epilogue is not None:
        a.before_epilogue()
    if concurrent:
        # the reduction first: its programs wait (bounded) for the flags, so it is resident when
        # the first chunk lands instead of after the host has queued every copy
        _reduce_dense(b, a, x, out, out_w, programs)
    if by_copy_engine:
        T = a.num_max_tokens_per_rank
        psum = [0] + list(a.host_psum)
        regions = [(s, psum[s], psum[s + 1] - psum[s]) for s in b.peers()]
        _send_chunks(b, regions, x.data_ptr(), x.shape[1] * 2, T,
                     b.config.copy_engine_chunk_rows or dense_kernels.chunk_rows(T), fork)
    if not concurrent:  # the peers' reductions wait for this rank's copies: they go first here
        _reduce_dense(b, a, x, out, out_w, programs, send=not by_copy_engine)
    b.join(fork)


def _reduce_dense(b, a: CombineArgs, x, out, out_w, programs: int, send: bool = False) -> None:
    cfg = b.config
    dense_kernels.reduce_dense(
        out=out, out_weights=out_w, bias=a.bias, x=x, topk_weights=a.topk_weights, psum=a.psum,
        topk_idx=a.topk_idx, dst_buffer_slot_idx=a.layout.dst_buffer_slot_idx,
        combine_slot_idx=a.layout.combine_slot_idx, num_experts=a.num_experts, heap=b.heap.data,
        data_ptrs=b.heap.data_ptrs, send=send, sum_weights=a.sum_weights, tile=cfg.combine_dense_reduce_tile,
        send_tile=cfg.combine_dense_send_tile,
        sender_share=cfg.sender_share, counter=b.counter_combine_reduce, T=a.num_max_tokens_per_rank,
        flags_word=b.flags_word, flag_blocks=b.flag_blocks, num_programs=programs, **b.words(), **b.common())


def _send_weights(b, a: CombineArgs, stream) -> None:
    """Each peer's weights (``[rows, k]`` float32, a few hundred KB) in one copy on ``stream``
    before the side streams fork: every flag the row copies raise then follows them too, and the
    side streams carry one small copy per chunk (the flag) instead of two."""
    w = a.topk_weights
    if w is None or a.host_psum is None:
        return
    R, T, rank, k = b.num_ranks, a.num_max_tokens_per_rank, b.rank, w.shape[1]
    w_off, _ = dense_kernels.dense_area(R, T, a.x.shape[1], k)
    start = 0
    for s, end in enumerate(a.host_psum):
        if s != rank:
            copy_engine.copy_bytes(b.heap.data_addrs[s] + w_off + rank * T * k * 4, w.data_ptr() + start * k * 4,
                                   (end - start) * k * 4, stream)
        start = end


def _send_chunks(b, regions: list, src_addr: int, row_bytes: int, T: int, chunk: int, fork) -> None:
    """The copy engine's sends: for each ``(peer, first row, rows)`` of ``regions``, rows from
    ``src_addr`` (``row_bytes`` apart) to the peer's data area at row ``rank * T + r`` in chunks
    (``combine_dense.chunk_bounds``), each followed by the flags of its blocks of ``FLAG_ROWS`` rows
    (``flags[rank][block] = -1`` in the peer's signal area). Chunk-major over the peers (every
    peer's first chunk first); on GPUs region ``i`` on side stream ``i`` of ``fork``, else by the
    host at once. The flags are 4-byte copies, not a kernel's stores: raising them from a kernel on
    the side streams failed on GPUs (illegal address in CUDA graphs; cause not found)."""
    rank = b.rank
    sides = fork[1] if fork is not None else [None]
    flag_src = b.minus_one.data_ptr()
    flag_rows = dense_kernels.FLAG_ROWS
    bounds = [dense_kernels.chunk_bounds(count, chunk) for _, _, count in regions]
    for c in range(max(map(len, bounds), default=0)):
        for i, (s, start, count) in enumerate(regions):
            if c >= len(bounds[i]):
                continue
            r0, rows = bounds[i][c]
            side = sides[i % len(sides)]
            stream = side and side.cuda_stream
            copy_engine.copy_bytes(b.heap.data_addrs[s] + (rank * T + r0) * row_bytes,
                                   src_addr + (start + r0) * row_bytes, rows * row_bytes, stream)
            # the flags of every block of FLAG_ROWS rows that this copy completes (r0 is a multiple)
            first, last = r0 // flag_rows, -(-(r0 + rows) // flag_rows)
            flags = b.heap.signal_addrs[s] + 4 * (b.flags_word + rank * b.flag_blocks + first)
            copy_engine.copy_bytes(flags, flag_src, 4 * (last - first), stream)
