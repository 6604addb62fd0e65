"""The symmetric backend's dispatch: routing layout and count exchange, then one of two routes.

* **rows** (:mod:`tritonep.kernels.dispatch`): plain rows (bf16, or FP8 given with its scales),
  tiled push and copy-out. When the host knows the received counts (a synced dispatch, or a cached
  dispatch of a synced handle) and the peers' rows hold ``KernelConfig.copy_engine_min_bytes`` or more,
  the copy engine moves the row data out of the receive area (0 SMs) and the SMs only the scales
  and metadata.
* **tokens** (:mod:`tritonep.kernels.dispatch_expand`): expand mode and the in-kernel FP8 cast, one
  (token, destination) per program iteration.

A fresh dispatch first runs the layout kernel (:mod:`tritonep.kernels.layout`), which counts and
announces the counts to the peers; the gather kernel then reads what the peers announced. With
``do_cpu_sync`` the gather also writes the counts and the status words into pinned host memory
and then raises a counter there, which the host polls (a memory read, no driver call) before it
allocates exact-size outputs. Without it, the
row push reads its own rows' offset from the announced counts itself, so the gather follows it.
"""
from __future__ import annotations

import functools

import torch

from ... import copy_engine
from ... import layout as layout_mod
from ... import recording
from ... import sizing
from ...errors import raise_recorded
from ...kernels import INTERPRET, cdiv
from ...kernels import dispatch as rows_kernels
from ...kernels import dispatch_expand as token_kernels
from ...kernels import layout as layout_kernels
from ...sizing import num_expanded_rows
from ...status import CountWords
from ..base import DispatchArgs, DispatchResult, new_recv_sf


def dispatch(b, a: DispatchArgs) -> DispatchResult:
    """``b``: the :class:`~tritonep.backends.symmetric.core.SymmetricBackend`."""
    n, k = a.topk_idx.shape
    R, T = b.num_ranks, a.num_max_tokens_per_rank
    L = a.num_experts // R
    H = a.x.shape[1]
    num_sf = H // 128 if a.quantize else (a.sf.shape[1] if a.sf is not None else 0)
    row_bytes = H if a.quantize else a.x.shape[1] * a.x.element_size()
    out_dtype = torch.float8_e4m3fn if a.quantize else a.x.dtype
    sf_dtype = torch.float32 if a.quantize else (a.sf.dtype if a.sf is not None else None)
    programs = b.programs(a.num_sms)
    rows_route = not (a.expand or a.quantize)
    expand_base = None
    meta = None  # (without a host sync: the handle's metadata rows, in the layout's allocation)
    cap = None  # outputs of fewer rows than the worst case (a.recv_capacity)
    if a.cached is None:
        if not a.cpu_sync and a.recv_capacity is not None:
            worst = num_expanded_rows(None, R * T, k, L, a.expert_alignment) if a.expand else R * T
            cap = a.recv_capacity if a.recv_capacity < worst else None
        # a synced dispatch of plain rows gathers the counts in the count kernel (nothing runs
        # between them); without a host sync the row push reads its own rows' offset from the
        # peers' counts: the gather is queued after it, one launch fewer before rows move
        fused = a.cpu_sync and rows_route
        layout, block_base, info, topk_copy, meta, host_words = _layout(b, a, programs, rows_route, fused)
        psum_per_expert = info[3 * R + L:3 * R + 2 * L]
        psum = per_expert = None
        if a.cpu_sync or not rows_route:
            if not fused:
                host_words = _gather(b, a, info, to_host=a.cpu_sync, cap=cap)
            psum, per_expert = info[:R], info[R:R + L]
            if a.expand:
                expand_base = info[3 * R + 2 * L:].view(R, L)
        if a.cpu_sync:
            read = functools.partial(_read_counts, b, host_words, a.num_experts)
            host, num_recv = read()
            recording.host_read(read, num_recv)  # (a replay reads here and sizes the outputs by it)
            host_counts = (host[:R], host[R:R + L])
        else:
            host_counts, num_recv = None, R * T
        num_exp = (num_expanded_rows(host_counts[1] if host_counts else None, R * T, k, L, a.expert_alignment)
                   if a.expand else 0)
        if cap is not None and a.expand:
            num_exp = cap
        elif cap is not None:
            num_recv = cap
    else:
        layout, block_base, info = a.layout, None, None
        psum, num_recv, num_exp = a.cached.psum, a.cached.num_recv_tokens, a.cached.num_expanded_tokens
        per_expert, host_counts, psum_per_expert, topk_copy = None, None, None, None

    rows = num_exp if a.expand else num_recv
    recv_x = torch.empty((rows, H), dtype=out_dtype, device=b.device)
    recv_sf = new_recv_sf(rows, num_sf, sf_dtype, b.device, a.sf_col_major) if sf_dtype is not None else None
    recv_topk_idx = None if a.expand else torch.empty((num_recv, k), dtype=torch.int64, device=b.device)
    recv_w = None
    if a.topk_weights is not None:
        recv_w = torch.empty((rows,) if a.expand else (rows, k), dtype=torch.float32, device=b.device)
    if a.cached is not None:
        # columns 0-1 are rewritten with the values they hold (expand mode reads the positions from
        # the other columns): one allocation fewer per cached dispatch
        recv_meta = a.cached.recv_src_metadata
    elif meta is not None:
        recv_meta = meta
    else:
        recv_meta = torch.empty((num_recv, k + 2), dtype=torch.int32, device=b.device)
    outputs = dict(recv_x_words=recv_x.view(torch.int32), recv_sf=recv_sf, recv_topk_idx=recv_topk_idx,
                   recv_topk_weights=recv_w, recv_src_metadata=recv_meta)
    if rows_route:
        host_psum = a.cached.host_psum if a.cached is not None else host_counts and host_counts[0]
        psum, per_expert = _rows(b, a, layout, block_base, psum, per_expert, info, host_psum, outputs, recv_x,
                                 row_bytes, num_sf, programs, cap)
    else:
        _tokens(b, a, layout, psum, expand_base, outputs, row_bytes, num_sf, programs, cap)
    if b.device.type != "cuda":
        b.check_status()
    if cap is not None and not a.expand:
        recv_meta = recv_meta[:cap]  # (the handle's rows are the outputs'; the kernels wrote none past them)
    return DispatchResult(recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, psum, per_expert, host_counts, layout,
                          psum_per_expert=psum_per_expert, topk_idx_copy=topk_copy,
                          allocations=(recv_x, recv_sf, recv_topk_idx, recv_w) if a.cached is not None
                          else (recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, info))


def _rows(b, a: DispatchArgs, layout, block_base, psum, per_expert, info, host_psum, outputs, recv_x, row_bytes: int,
          num_sf: int, programs: int, cap: int | None):
    """The rows route: push, (gather,) epilogue, and the copy engine's copy-out when it runs.
    Returns ``(psum, per_expert)`` (from the gather when it follows the push). ``cap``: the
    outputs' rows when fewer than the worst case (else None)."""
    R, T, k = b.num_ranks, a.num_max_tokens_per_rank, a.topk_idx.shape[1]
    L = a.num_experts // R
    area = sizing.dispatch_area(R, T, row_bytes, num_sf, k)
    by_copy_engine = _copy_engine_counts(b, host_psum, row_bytes)
    if host_psum is not None and 0 <= b.config.copy_engine_min_bytes <= (R - 1) * T * row_bytes:
        # other counts could choose the other copy-out: a replay with them could not follow
        recording.depends_on_counts("the received counts choose the copy-out")
    heap_words = b.heap.data.view(torch.int32)
    counts = dict(notified_word=b.notified_word, counts_word=b.counts_word, count_stride=sizing.COUNT_STRIDE)
    gather_into = None
    if psum is None:  # (no host sync: the push gathers the counts, see rows_kernels.push)
        gather_into = dict(_gather_args(b, a, info, False)[0], cap=cap, over_word=b.over_word,
                           announced_word=b.announced_word)
    rows_kernels.push(
        x_words=a.x.view(torch.int32), sf=a.sf, topk_idx=a.topk_idx, topk_weights=a.topk_weights,
        dst_buffer_slot_idx=layout.dst_buffer_slot_idx, combine_slot_idx=layout.combine_slot_idx,
        block_base=block_base, psum=psum, heap_words=heap_words, data_ptrs=b.heap.data_ptrs,
        counter=b.counter_dispatch_push, num_experts=a.num_experts, T=T, area=area, num_programs=programs,
        wait_freed=a.cached is not None, tile=b.config.dispatch_push_tile, counts_from_peers=psum is None,
        out_rows=cap, gather_into=gather_into,
        **counts, **outputs, **b.words(), **b.common())
    if psum is None:  # (the push gathered)
        psum, per_expert = info[:R], info[R:R + L]
    if a.before_epilogue is not None:
        a.before_epilogue()
    rows_kernels.epilogue(heap_words=heap_words, data_ptrs=b.heap.data_ptrs, counter=b.counter_dispatch_epilogue,
                          psum=psum, num_local_experts=L, T=T, area=area, num_programs=programs,
                          tile=b.config.dispatch_copy_out_tile, copy_x=by_copy_engine is None, **outputs,
                          **_capped(b, cap), **b.words(), **b.common())
    if by_copy_engine is not None:
        _copy_out_rows(b, recv_x, by_copy_engine, T, row_bytes, area[0])
    return psum, per_expert


def _capped(b, cap: int | None) -> dict:
    """The copy epilogue's arguments for outputs of ``cap`` rows (None: the worst case)."""
    return dict(out_rows=cap, over_word=b.over_word, announced_word=b.announced_word)


def _tokens(b, a: DispatchArgs, layout, psum, expand_base, outputs, row_bytes: int, num_sf: int, programs: int,
            cap: int | None):
    """The tokens route: expand mode and the in-kernel FP8 cast. Expanded rows are placed from
    expert ranks that travel with the tokens, except in a cached dispatch, which replays the
    positions stored in the handle's metadata."""
    R, T, k = b.num_ranks, a.num_max_tokens_per_rank, a.topk_idx.shape[1]
    L = a.num_experts // R
    ship_ranks = a.expand and a.cached is None
    slot_offsets = sizing.dispatch_slot_offsets(row_bytes, num_sf, k, expand=ship_ranks)
    x_words = a.x.view(torch.int32)
    token_kernels.push(
        x_words=x_words, sf=a.sf, topk_idx=a.topk_idx, topk_weights=a.topk_weights,
        dst_buffer_slot_idx=layout.dst_buffer_slot_idx, combine_slot_idx=layout.combine_slot_idx,
        expert_rank=layout.expert_rank if ship_ranks else None, data_ptrs=b.heap.data_ptrs,
        counter=b.counter_dispatch_push, num_local_experts=L, T=T, slot_offsets=slot_offsets,
        num_programs=programs, block_words=b.block_words(x_words.shape[1]), quantize=a.quantize,
        round_scale=a.round_scale, hidden=a.x.shape[1], quant_groups=64 if INTERPRET else 8, **b.words(),
        **b.common())
    if a.before_epilogue is not None:
        a.before_epilogue()
    token_kernels.epilogue(
        data_ptrs=b.heap.data_ptrs, counter=b.counter_dispatch_epilogue, psum=psum, num_local_experts=L, T=T,
        slot_offsets=slot_offsets, wait=True, num_programs=programs, block_words=b.block_words(row_bytes // 4),
        expand_base=expand_base, expand_from_metadata=a.expand and a.cached is not None, **outputs,
        **_capped(b, cap), **b.words(), **b.common())


def _layout(b, a: DispatchArgs, programs: int, rows_route: bool, gather: bool = False):
    """Routing layout on the device and this rank's counts sent to the peers; returns ``(Layout,
    block_base, info, topk_copy, meta, host words)``: ``info`` is still to be filled by
    :func:`_gather` (what the peers sent) unless ``gather`` (the count kernel gathers, for the
    host too where ``a.cpu_sync``: the host words are then :func:`_gather`'s, else None),
    ``topk_copy`` is None unless ``a.copy_topk``, ``meta`` (the handle's
    ``recv_src_metadata``, ``[R * T, k + 2]`` int32) is None unless the dispatch has no host sync. On the rows route the push computes
    the slot indices itself (from ``block_base``), so only the count kernel runs here; otherwise
    the slots kernel fills them and ``block_base`` is None.

    Every int32 result lives in one allocation (sections 16-byte aligned): each torch call costs
    the host several microseconds, and at small token counts the host is what a dispatch waits for."""
    n, k = a.topk_idx.shape
    R, L = b.num_ranks, a.num_experts // b.num_ranks
    block = rows_kernels.BLOCK_TOKENS if rows_route else layout_kernels.BLOCK_TOKENS
    nblocks = cdiv(max(n, 1), block)
    sizes = (n * k, n * k, 2 * nblocks * R, R * (1 + L), layout_kernels.info_size(R, L, a.expand),
             2 * n * k if a.copy_topk else 0, n * k if a.expand else 0,
             layout_kernels.expert_rank_words(n, k, a.num_experts) if a.expand else 0,
             0 if a.cpu_sync else R * a.num_max_tokens_per_rank * (k + 2))
    starts = []
    total = 0
    for size in sizes:
        starts.append(total)
        total += -(-size // 4) * 4
    words = torch.empty(total, dtype=torch.int32, device=b.device)
    dst_slot, cslot, blocks, send_counts, info, topk_copy, expert_rank, rank_counts, meta = (
        words[a0:a0 + size] for a0, size in zip(starts, sizes))
    dst_slot, cslot, blocks = dst_slot.view(n, k), cslot.view(n, k), blocks.view(2, nblocks, R)
    send_counts = send_counts.view(R, 1 + L)
    topk_copy = topk_copy.view(a.topk_idx.dtype).view(n, k) if a.copy_topk else None
    gather_into, host = _gather_args(b, a, info, a.cpu_sync) if gather else (None, None)
    layout_kernels.count(topk_idx=a.topk_idx, topk_copy=topk_copy, block_counts=blocks[0], block_base=blocks[1],
                         scratch=b.scratch, send_counts=send_counts, counter=b.counter_layout,
                         num_experts=a.num_experts, freed_word=b.freed_word, num_programs=programs,
                         block_tokens=block, counts_word=b.counts_word, count_stride=sizing.COUNT_STRIDE,
                         notified_word=b.notified_word, gather_into=gather_into, **b.common())
    if not rows_route:
        layout_kernels.slots(topk_idx=a.topk_idx, block_base=blocks[1], dst_buffer_slot_idx=dst_slot,
                             combine_slot_idx=cslot, num_experts=a.num_experts, rank=b.rank, num_ranks=R,
                             T=a.num_max_tokens_per_rank, num_programs=programs)
    if a.expand:
        expert_rank = expert_rank.view(n, k)
        # (no scratch when one block holds every token: an empty slice would point past the
        # allocation, where a recording could not place it)
        layout_kernels.expert_ranks(topk_idx=a.topk_idx, num_experts=a.num_experts, out=expert_rank,
                                    counts=rank_counts if rank_counts.numel() else expert_rank)
    else:
        expert_rank = None
    layout = layout_mod.Layout(dst_slot, cslot, send_counts, None, expert_rank)
    meta = None if a.cpu_sync else meta.view(R * a.num_max_tokens_per_rank, k + 2)
    return layout, (blocks[1] if rows_route else None), info, topk_copy, meta, host


def _gather_args(b, a: DispatchArgs, info: torch.Tensor, to_host: bool) -> tuple:
    """``(the gather's own arguments, the host's count words or None)``: see :func:`_gather`."""
    host = None
    if to_host:
        words = 3 * b.num_ranks + a.num_experts // b.num_ranks + 4  # (the counts, then the four status words)
        host = b.count_words.get(words)
        if host is None:
            host = b.count_words[words] = CountWords(words, b.device)
    return dict(out=info, host_out=host.tensor if host is not None else None, wait_ns=b.wait_ns,
                alignment=a.expert_alignment, expand=a.expand), host


def _gather(b, a: DispatchArgs, info: torch.Tensor, to_host: bool = False, cap: int | None = None):
    """Fill ``info`` (see :mod:`tritonep.kernels.layout`) from the counts every peer announced.

    ``to_host``: the kernel also writes the host-read part of ``info`` and the status words into
    pinned host memory (zero-copy over PCIe: no copy launches, no sync), then raises a counter
    there; returns those words (:class:`tritonep.status.CountWords`) for :func:`_read_counts`,
    else None. ``cap``: the outputs' rows when fewer than the worst case: the kernel tells every
    rank whether this rank's rows fit."""
    args, host = _gather_args(b, a, info, to_host)
    layout_kernels.gather(**args, num_local_experts=a.num_experts // b.num_ranks, counts_word=b.counts_word,
                          count_stride=sizing.COUNT_STRIDE, notified_word=b.notified_word, cap=cap,
                          over_word=b.over_word, announced_word=b.announced_word, **b.common())
    return host


def _read_counts(b, words, num_experts: int) -> tuple:
    """The counts the gather kernel (queued last) writes to the pinned ``words`` (a
    :class:`tritonep.status.CountWords`), once it ran: ``(host words, rows this rank receives)``.
    Raises if a wait before it timed out, or (on every rank) if any rank's expert ids failed the
    layout kernel's checks."""
    b.host_wait("dispatch (waiting for the received counts)", ready=words.ready)
    host = words.take()
    raise_recorded(host[-4:], b.rank, b.gpu_timeout_s)
    host = host[:-4]
    _reject_bad_routing(b, host, num_experts)
    return host, host[b.num_ranks - 1]


def _reject_bad_routing(b, host: list, num_experts: int) -> None:
    """Raise ``ValueError`` on every rank if any rank's ``topk_idx`` failed the checks that the
    layout kernel made. No row moved yet: release the buffer first, so that the next operation
    proceeds."""
    R = b.num_ranks
    L = num_experts // R
    his, dups = host[R + L:2 * R + L], host[2 * R + L:3 * R + L]
    bad = [s for s in range(R) if his[s] >= num_experts or dups[s]]
    if not bad:
        return
    b.release()
    s = b.rank if b.rank in bad else bad[0]
    what = (f"holds expert id {his[s]}, but num_experts is {num_experts} (ids must be < it)"
            if his[s] >= num_experts else "selects the same expert twice in one row")
    who = "topk_idx" if s == b.rank else f"rank {s}'s topk_idx"
    raise ValueError(f"{who} {what}; the dispatch was called off on every rank")


def _copy_engine_counts(b, psum, row_bytes: int):
    """``psum`` (the received rows' inclusive prefix per source, a host list, or None) when the copy
    engine moves the rows out of the receive area (``KernelConfig.copy_engine_min_bytes``), else None."""
    if psum is None or b.config.copy_engine_min_bytes < 0:
        return None
    own = psum[b.rank] - (psum[b.rank - 1] if b.rank else 0)
    return psum if (psum[-1] - own) * row_bytes >= b.config.copy_engine_min_bytes else None


def _copy_out_rows(b, recv_x: torch.Tensor, psum: list, T: int, row_bytes: int, row_pitch: int) -> None:
    """Each peer's rows from its receive region (``sizing.dispatch_area``: one row every
    ``row_pitch`` bytes, so one dense block when the row is a multiple of 16 bytes) to its output
    rows by the copy engine, queued after the epilogue that moved everything else; then end the
    dispatch: ``freed = seq`` to every peer, so that they may write these slots again."""
    out = recv_x.view(torch.uint8)
    stream = torch.cuda.current_stream(b.device).cuda_stream if b.device.type == "cuda" else 0
    start = 0
    for s, end in enumerate(psum):
        if s != b.rank:
            copy_engine.copy_rows(out[start:end], b.heap.data, s * T * row_pitch, row_pitch, end - start, row_bytes,
                                  stream)
        start = end
    b.release()
