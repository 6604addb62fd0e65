"""Scale-up backend: the symmetric heap and the Triton kernels (NVLink on GPUs, /dev/shm on CPUs).

Every operation (dispatch, combine, barrier) is collective and numbered: ``seq`` goes 1, 2, ...,
wrapping before 2^31. The number lives on the device (``_op_seq``: the last operation that ended),
read by every launch and advanced by each operation's last launch, so a CUDA graph that replays
operations numbers each replay anew; the host never knows it. Before writing into a peer's buffer
a rank waits until that peer has raised ``freed = prev_seq`` (it finished reading the previous
operation); after writing it raises ``ready = seq``; the reader waits for ``ready == seq`` from
every peer. A dispatch first exchanges counts (``notified = seq``, see ``kernels/layout.py``). The
flags can only ever hold the previous or the current number, so equality tests are exact and
wrap-safe. docs/design.md has the launches.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .. import copy_engine
from .. import layout as layout_mod
from .. import sizing
from .. import envs as envs_mod
from ..envs import get_envs
from ..errors import OP_NAMES, CommTimeoutError
from ..heap import create_heap
from ..kernels import INTERPRET, block_size, cdiv
from ..kernels import combine as combine_kernels
from ..kernels import combine_rows, dispatch_rows
from ..kernels import dispatch as dispatch_kernels
from ..kernels import layout as layout_kernels
from ..kernels import primitives
from .base import CombineArgs, DispatchArgs, DispatchResult, new_recv_sf, num_expanded_rows

_FLAG_GRAIN = 8
# Counter slots, one per kernel kind, for the last-program detector.
_C_DISPATCH_PUSH, _C_DISPATCH_EPILOGUE, _C_COMBINE_PUSH, _C_COMBINE_REDUCE, _C_LAYOUT = range(5)


class SymmetricBackend:
    name = "symmetric"

    def __init__(self, group, num_bytes: int, device: torch.device, gpu_timeout_s: float, cpu_timeout_s: float,
                 exact_recv_alloc: bool = True, max_tokens: int = 0,
                 pipelined_dispatch: bool = False, pipelined_combine: bool = True,
                 copy_engine_min_bytes: int = -1):
        import torch.distributed as dist

        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.num_bytes = num_bytes
        self.gpu_timeout_s = gpu_timeout_s
        self.cpu_timeout_s = cpu_timeout_s
        self._timeout_ns = int(gpu_timeout_s * 1e9)
        # the pipelined launches' flags, per source rank: one word per block of combine rows, then
        # one counter per block of dispatch slots, for up to ``max_tokens`` tokens per rank (the
        # buffer's num_max_tokens_per_rank) in blocks of _FLAG_GRAIN rows, the smallest tile that
        # benchmarks/tune_tiles.py tries
        self._flag_blocks = cdiv(max_tokens, _FLAG_GRAIN) if pipelined_combine else 0
        # (the slot counters serve the overlapped copy-out too, so they exist whenever T is known)
        self._slot_blocks = cdiv(max_tokens, _FLAG_GRAIN)
        self.pipelined_dispatch = pipelined_dispatch
        words = sizing.num_signal_words(self.num_ranks, self._flag_blocks + self._slot_blocks)
        self.heap = create_heap(group, num_bytes, words, device)
        (self._ready_word, self._freed_word, self._notified_word, self._counts_word,
         self._flags_word) = sizing.signal_offsets(self.num_ranks)
        self._slot_counts_word = self._flags_word + self.num_ranks * self._flag_blocks
        # the number of the last operation that ended (see the module docstring)
        self._op_seq = torch.zeros(1, dtype=torch.int32, device=device)
        self._status = torch.zeros(4, dtype=torch.int32, device=device)
        self._counters = torch.zeros(8, dtype=torch.int32, device=device)
        self.exact_recv_alloc = exact_recv_alloc
        # the dispatch's received rows leave the receive slots by the copy engine when the host knows
        # the counts and they hold at least this many bytes (negative: never)
        self.copy_engine_min_bytes = copy_engine_min_bytes
        # host copy of the counts and the status words, filled without waiting for later kernels
        self._staged = None
        # the layout count kernel's accumulators: zero between dispatches (the kernel re-zeroes them);
        # allocated here for the largest expert count, never inside a call that a CUDA graph captures
        self._scratch = torch.zeros(layout_kernels.scratch_size(self.num_ranks, sizing.MAX_LOCAL_EXPERTS),
                                    dtype=torch.int32, device=device)
        # pinned host words the gather kernel writes the counts to
        self._host_words = None
        # the copy-engine combine: the largest group it runs in, the value its flag copies write, and
        # its side streams and events
        envs = get_envs()
        self.ce_combine_max_ranks = envs.TRITONEP_COPY_ENGINE_COMBINE_MAX_RANKS
        # rows per chunk (0: auto)
        self.ce_chunk_rows = envs.TRITONEP_COPY_ENGINE_CHUNK_ROWS
        if self.ce_chunk_rows < 0 or self.ce_chunk_rows % combine_rows.FLAG_ROWS:
            raise ValueError(f"TRITONEP_COPY_ENGINE_CHUNK_ROWS={self.ce_chunk_rows}: expected 0 (auto) or a positive "
                             f"multiple of {combine_rows.FLAG_ROWS}")
        self._minus_one = torch.full((self._flag_blocks + 4,), -1, dtype=torch.int32, device=device)
        self._ce_streams = self._ce_events = None
        # side streams the peers' copies share (peer i on stream i % n); 0: one per peer. (Two per
        # peer, chunks alternating, measured slower at 2 ranks: 518 against 399 us at 8192 tokens)
        self.ce_side_streams = 0
        # (tokens, channels, warps) of the copy-engine combine's reduction steps (None: the default)
        self.ce_reduce_tile = None
        # the SM senders of a combine into the copy-engine layout (no-sync handles; groups above
        # ce_combine_max_ranks): (rows, 4-byte words) per step (None: combine_rows.SEND_TILE), and
        # whether each step's next words are loaded before the current ones are stored (on one H200
        # both together 6 % faster; until 2026-11-29: (32, 256), False)
        self.combine_send_tile = None
        self.combine_send_prefetch = True
        # cached dispatch by the copy engine (_dispatch_broadcast), and its rows per copy (0: auto)
        self.ce_dispatch = envs.TRITONEP_COPY_ENGINE_DISPATCH
        self.ce_dispatch_chunk_rows = 0
        # a dispatch whose received rows the copy engine moves out does so chunk by chunk while the
        # push runs (_copy_out_overlapped), and the rows per chunk (0: auto)
        self.copy_out_overlap = envs.TRITONEP_DISPATCH_COPY_OUT_OVERLAP
        self.copy_out_chunk_rows = 0
        # the dispatch push loads each tile of rows once for all its destinations, and each step's
        # next columns before it stores the current ones (both on one-H200 measurements only)
        self.fused_push = envs.TRITONEP_DISPATCH_FUSED_PUSH
        self.push_prefetch = envs.TRITONEP_DISPATCH_PUSH_PREFETCH
        # (tokens, 4-byte words, warps) of the push's steps (None: dispatch_rows.PUSH_TILE), as
        # dispatch_rows.push_tile fits them to a pipelined or fresh push
        self.push_tile = envs_mod.tile(envs.TRITONEP_DISPATCH_PUSH_TILE)
        # groups larger than ce_combine_max_ranks send the copy-engine layout's rows with SMs (half
        # of the reduction's programs) instead of the pipelined combine's layout: 8 % faster at 4
        # ranks (bench, no-sync column of ce_all); GPU tests passed at 4 and 8 ranks sharing one H200
        self.copied_above_ce_ranks = envs.TRITONEP_SM_COPIED_COMBINE

    # -- protocol ---------------------------------------------------------------------------
    def _common(self) -> dict:
        return dict(signal_ptrs=self.heap.signal_ptrs, status=self._status, rank=self.rank,
                    num_ranks=self.num_ranks, seq_ptr=self._op_seq, timeout_ns=self._timeout_ns)

    def check_status(self) -> None:
        """Raise :class:`CommTimeoutError` if any earlier wait of this buffer timed out (host sync)."""
        code, peer, seq, _ = self._status.tolist()
        if code:
            raise CommTimeoutError(self.rank, peer, OP_NAMES.get(code, f"op {code}"), self.gpu_timeout_s,
                                   f"operation #{seq}")

    def _host_wait(self, what: str, event=None) -> None:
        """Block until the queued GPU work (or ``event``) finishes, at most ``cpu_timeout_s``."""
        if self.device.type != "cuda":
            return
        if event is None:
            event = torch.cuda.Event()
            event.record()
        start = time.monotonic()
        deadline = start + self.cpu_timeout_s
        while not event.query():
            now = time.monotonic()
            if now > deadline:
                raise CommTimeoutError(self.rank, -1, what, self.cpu_timeout_s, "host wait for the GPU")
            # spin for the first millisecond: the counts usually arrive within tens of microseconds,
            # and a sleep costs at least the kernel's timer slack (~50 us) per poll
            if now - start > 1e-3:
                time.sleep(50e-6)

    def _programs(self, num_sms: int) -> int:
        return max(1, num_sms)

    def _block_words(self, words: int) -> int:
        # The interpreter pays per operation, not per element: take whole rows at once there.
        cap = 8192 if INTERPRET else 1024
        return min(cap, block_size(words))

    # -- operations -------------------------------------------------------------------------
    def _layout(self, a: DispatchArgs, programs: int, rows_path: bool):
        """Routing layout on the device and this rank's counts sent to the peers; returns
        ``(Layout, block_base, info, topk_copy)``: ``info`` is still to be filled by :meth:`_gather`
        (what the peers sent), ``topk_copy`` is None unless ``a.copy_topk``. On the row path the push
        computes the slot indices itself (from ``block_base``), so only the count kernel runs here;
        otherwise the slots kernel fills them and ``block_base`` is None.

        Every int32 result lives in one allocation (sections 16-byte aligned): each torch call costs
        the host ~5-20 us, and at small token counts the host is what a dispatch waits for."""
        n, k = a.topk_idx.shape
        R, L = self.num_ranks, a.num_experts // self.num_ranks
        block = dispatch_rows.BLOCK_TOKENS if rows_path else layout_kernels.BLOCK_TOKENS
        nblocks = cdiv(max(n, 1), block)
        sizes = (n * k, n * k, 2 * nblocks * R, R * (1 + L), layout_kernels.info_size(R, L, a.expand),
                 2 * n * k if a.copy_topk else 0)
        starts = []
        total = 0
        for size in sizes:
            starts.append(total)
            total += -(-size // 4) * 4
        words = torch.empty(total, dtype=torch.int32, device=self.device)
        dst_slot, cslot, blocks, send_counts, info, topk_copy = (words[a0:a0 + size] for a0, size in zip(starts, sizes))
        dst_slot, cslot, blocks = dst_slot.view(n, k), cslot.view(n, k), blocks.view(2, nblocks, R)
        send_counts = send_counts.view(R, 1 + L)
        topk_copy = topk_copy.view(a.topk_idx.dtype).view(n, k) if a.copy_topk else None
        layout_kernels.count(topk_idx=a.topk_idx, topk_copy=topk_copy, block_counts=blocks[0], block_base=blocks[1],
                             scratch=self._scratch, send_counts=send_counts, counter=self._counters[_C_LAYOUT:],
                             num_experts=a.num_experts, freed_word=self._freed_word, num_programs=programs,
                             block_tokens=block, counts_word=self._counts_word, count_stride=sizing.COUNT_STRIDE,
                             notified_word=self._notified_word, **self._common())
        if not rows_path:
            layout_kernels.slots(topk_idx=a.topk_idx, block_base=blocks[1], dst_buffer_slot_idx=dst_slot,
                                 combine_slot_idx=cslot, num_experts=a.num_experts, rank=self.rank, num_ranks=R,
                                 T=a.num_max_tokens_per_rank, num_programs=programs)
        expert_rank = layout_mod.expert_ranks(a.topk_idx, a.num_experts) if a.expand else None
        layout = layout_mod.Layout(dst_slot, cslot, send_counts, None, expert_rank)
        return layout, (blocks[1] if rows_path else None), info, topk_copy

    def _gather(self, a: DispatchArgs, info: torch.Tensor, to_host: bool = False, end_op: bool = False):
        """Fill ``info`` (see :mod:`tritonep.kernels.layout`) from the counts every peer announced.

        ``to_host``: the kernel also writes the host-read part of ``info`` and the status words into
        pinned host memory (zero-copy over PCIe: no copy launches, no extra sync); returns
        ``(host words, event)`` for :meth:`_read_staged`, else None."""
        c = self._common()
        R, L = self.num_ranks, a.num_experts // self.num_ranks
        host = None
        if to_host:
            words = 3 * R + L + self._status.numel()
            if self._host_words is None or self._host_words.numel() < words:
                self._host_words = torch.empty(words, dtype=torch.int32, device="cpu",
                                               pin_memory=self.device.type == "cuda")
            host = self._host_words[:words]
        layout_kernels.gather(out=info, host_out=host, num_local_experts=L, alignment=a.expert_alignment,
                              expand=a.expand, end_op=end_op, counts_word=self._counts_word,
                              count_stride=sizing.COUNT_STRIDE, notified_word=self._notified_word, **c)
        if not to_host:
            return None
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return host, event

    def _stage(self, info: torch.Tensor):
        """Queue a copy of ``info`` and the status words to pinned host memory; returns
        ``(host tensor, event)``, or ``(info, None)`` on CPU ranks (kernels there are synchronous)."""
        if self.device.type != "cuda":
            return torch.cat([info, self._status]), None
        n = info.numel() + self._status.numel()
        if self._staged is None or self._staged.numel() < n:
            self._staged = torch.empty(n, dtype=torch.int32, pin_memory=True)
        self._staged[:info.numel()].copy_(info, non_blocking=True)
        self._staged[info.numel():n].copy_(self._status, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return self._staged[:n], event

    def _read_staged(self, staged, event, what: str) -> list:
        """The staged words once their copy completed; raises if a wait before it timed out."""
        self._host_wait(what, event)
        host = staged.tolist()
        code, peer, seq = host[-4:-1]
        if code:
            raise CommTimeoutError(self.rank, peer, OP_NAMES.get(code, f"op {code}"), self.gpu_timeout_s,
                                   f"operation #{seq}")
        return host[:-4]

    def _reject_bad_routing(self, host: list, num_experts: int, release: bool = True) -> None:
        """Raise ``ValueError`` on every rank if any rank's ``topk_idx`` failed the checks that the
        layout kernel made. ``release``: no row moved yet; release the buffer so that the next
        operation proceeds (otherwise the dispatch ran to completion and its results are dropped)."""
        R = self.num_ranks
        L = num_experts // R
        his, dups = host[R + L:2 * R + L], host[2 * R + L:3 * R + L]
        bad = [s for s in range(R) if his[s] >= num_experts or dups[s]]
        if not bad:
            return
        if release:
            primitives.release(self.heap.signal_ptrs, self._status, self.num_ranks, self._freed_word + self.rank,
                               self._op_seq)
        s = self.rank if self.rank in bad else bad[0]
        what = (f"holds expert id {his[s]}, but num_experts is {num_experts} (ids must be < it)"
                if his[s] >= num_experts else "selects the same expert twice in one row")
        who = "topk_idx" if s == self.rank else f"rank {s}'s topk_idx"
        raise ValueError(f"{who} {what}; the dispatch was called off on every rank")

    def dispatch(self, a: DispatchArgs) -> DispatchResult:
        n, k = a.topk_idx.shape
        R, T = self.num_ranks, a.num_max_tokens_per_rank
        L = a.num_experts // R
        H = a.x.shape[1]
        x_words = a.x.view(torch.int32)
        num_sf = H // 128 if a.quantize else (a.sf.shape[1] if a.sf is not None else 0)
        row_bytes = H if a.quantize else x_words.shape[1] * 4
        out_dtype = torch.float8_e4m3fn if a.quantize else a.x.dtype
        sf_dtype = torch.float32 if a.quantize else (a.sf.dtype if a.sf is not None else None)
        # Expanded rows are placed from expert ranks that travel with the tokens, except for cached
        # dispatch, which replays the positions stored in the handle's metadata.
        ship_ranks = a.expand and a.cached is None
        programs = self._programs(a.num_sms)
        expand_base = None
        rows_path = not (a.expand or a.quantize)
        # rows per chunk of the overlapped copy-out: a bad setting raises here, before any kernel
        chunk = self._copy_out_chunk(T) if self.copy_out_overlap and rows_path else 0
        slot_layout = (sizing.dispatch_rows_layout(R, T, row_bytes, num_sf, k) if rows_path
                       else sizing.dispatch_slot_layout(row_bytes, num_sf, k, expand=ship_ranks))
        # rows move into worst-case outputs while the host reads the counts (see exact_recv_alloc)
        overlap = a.cached is None and a.cpu_sync and rows_path and not a.sf_col_major and not self.exact_recv_alloc
        staged = None
        if a.cached is None:
            layout, block_base, info, topk_copy = self._layout(a, programs, rows_path)
            psum_per_expert = info[3 * R + L:3 * R + 2 * L]
            # the row push can read its own rows' offset from the peers' counts, so the gather is
            # queued after it and the host launches one kernel fewer before rows move
            late_gather = rows_path and (overlap or not a.cpu_sync)
            psum = per_expert = host_words = None
            if not late_gather:
                host_words = self._gather(a, info, to_host=a.cpu_sync)
                psum, per_expert = info[:R], info[R:R + L]
                if a.expand:
                    expand_base = info[3 * R + 2 * L:].view(R, L)
            if a.cpu_sync and not overlap:
                # the gather kernel also wrote the counts and the status words to host memory
                host = self._read_staged(*host_words, "dispatch (waiting for the received counts)")
                self._reject_bad_routing(host, a.num_experts)
                host_counts = (host[:R], host[R:R + L])
                num_recv = host[R - 1]
            else:
                host_counts, num_recv = None, R * T
            num_exp = (num_expanded_rows(host_counts[1] if host_counts else None, R * T, k, L, a.expert_alignment)
                       if a.expand else 0)
        else:
            layout, block_base = a.layout, None
            psum, num_recv, num_exp = a.cached.psum, a.cached.num_recv_tokens, a.cached.num_expanded_tokens
            per_expert, host_counts, psum_per_expert, topk_copy = None, None, None, None
        rows = num_exp if a.expand else num_recv
        recv_x = torch.empty((rows, H), dtype=out_dtype, device=self.device)
        recv_sf = new_recv_sf(rows, num_sf, sf_dtype, self.device, a.sf_col_major) if sf_dtype is not None else None
        recv_topk_idx = None if a.expand else torch.empty((num_recv, k), dtype=torch.int64, device=self.device)
        recv_w = None
        if a.topk_weights is not None:
            recv_w = torch.empty((rows,) if a.expand else (rows, k), dtype=torch.float32, device=self.device)
        if a.cached is not None:
            # columns 0-1 are rewritten with the values they hold (expand mode reads the positions
            # from the other columns): one allocation fewer per cached dispatch
            recv_meta = a.cached.recv_src_metadata
        else:
            recv_meta = torch.empty((num_recv, k + 2), dtype=torch.int32, device=self.device)
        c = self._common()
        words = dict(ready_word=self._ready_word, freed_word=self._freed_word)
        outputs = dict(recv_x_words=recv_x.view(torch.int32), recv_sf=recv_sf, recv_topk_idx=recv_topk_idx,
                       recv_topk_weights=recv_w, recv_src_metadata=recv_meta)
        if rows_path and a.cached is not None and self._broadcast_dispatch(T, row_bytes, num_sf, k):
            self._dispatch_broadcast(a, outputs, row_bytes, programs)
        elif rows_path:
            counts_words = dict(notified_word=self._notified_word, counts_word=self._counts_word,
                                count_stride=sizing.COUNT_STRIDE)
            counted = programs >= 2 and R > 1 and self._slot_blocks * dispatch_rows.BLOCK_TOKENS >= T
            pipelined = counted and self.pipelined_dispatch
            host_psum = a.cached.host_psum if a.cached is not None else host_counts and host_counts[0]
            ce = self._copy_engine_counts(host_psum, row_bytes)
            # the copy engine moves each chunk of received rows out as soon as it is in; every rank
            # counts its rows for that (a setting all ranks share), but only ranks whose host knows
            # the counts copy them out so, the others zero the counters in their epilogue
            count_out = counted and not pipelined and self.copy_out_overlap
            overlap_out = count_out and ce is not None
            if (pipelined or overlap_out) and a.before_epilogue is not None:  # outputs written during the push
                a.before_epilogue()
            fork = self._fork() if overlap_out and self.device.type == "cuda" else None
            tile = dispatch_rows.push_tile(self.push_tile, pipelined, fresh=block_base is not None)
            dispatch_rows.push(
                x_words=x_words, sf=a.sf, topk_idx=a.topk_idx, topk_weights=a.topk_weights,
                dst_buffer_slot_idx=layout.dst_buffer_slot_idx, combine_slot_idx=layout.combine_slot_idx,
                block_base=block_base, psum=psum, heap_words=self.heap.data.view(torch.int32),
                data_ptrs=self.heap.data_ptrs, counter=self._counters[_C_DISPATCH_PUSH:], num_experts=a.num_experts,
                T=T, slot_layout=slot_layout, num_programs=programs - 1 if overlap_out else programs,
                wait_freed=a.cached is not None, counts_from_peers=psum is None,
                slot_counts_word=self._slot_counts_word, slot_blocks=self._slot_blocks, pipelined=pipelined,
                end_op=psum is not None, count_arrivals=count_out, fused=self.fused_push, tile=tile,
                prefetch=self.push_prefetch, **counts_words, **outputs,
                **words, **c)
            if psum is None:  # the gather follows the push (and ends a pipelined dispatch)
                self._gather(a, info, end_op=pipelined)
                psum, per_expert = info[:R], info[R:R + L]
                if overlap:
                    staged = self._stage(info[:3 * R + L])
            if overlap_out:
                self._copy_out_overlapped(outputs, recv_x, ce, psum, T, L, row_bytes, slot_layout, chunk, fork)
            elif not pipelined:
                if a.before_epilogue is not None:
                    a.before_epilogue()
                dispatch_rows.epilogue(heap_words=self.heap.data.view(torch.int32), data_ptrs=self.heap.data_ptrs,
                                       counter=self._counters[_C_DISPATCH_EPILOGUE:], psum=psum, num_local_experts=L,
                                       T=T, slot_layout=slot_layout, num_programs=programs, copy_x=ce is None,
                                       zero_counts=count_out, slot_counts_word=self._slot_counts_word,
                                       slot_blocks=self._slot_blocks, **outputs, **words, **c)
                if ce is not None:
                    self._copy_out_rows(recv_x, ce, T, row_bytes, slot_layout[0])
        else:
            # expand mode and in-kernel FP8 cast: one (token, destination) per program iteration
            dispatch_kernels.push(
                x_words=x_words, sf=a.sf, topk_idx=a.topk_idx, topk_weights=a.topk_weights,
                dst_buffer_slot_idx=layout.dst_buffer_slot_idx, combine_slot_idx=layout.combine_slot_idx,
                expert_rank=layout.expert_rank if ship_ranks else None,
                data_ptrs=self.heap.data_ptrs, counter=self._counters[_C_DISPATCH_PUSH:], num_local_experts=L, T=T,
                slot_layout=slot_layout, num_programs=programs, block_words=self._block_words(x_words.shape[1]),
                quantize=a.quantize, round_scale=a.round_scale, hidden=H, quant_groups=64 if INTERPRET else 8,
                **words, **c)
            if a.before_epilogue is not None:
                a.before_epilogue()
            dispatch_kernels.epilogue(
                data_ptrs=self.heap.data_ptrs, counter=self._counters[_C_DISPATCH_EPILOGUE:], psum=psum,
                num_local_experts=L, T=T, slot_layout=slot_layout, wait=True, num_programs=programs,
                block_words=self._block_words(row_bytes // 4), expand_base=expand_base,
                expand_from_metadata=a.expand and a.cached is not None, **outputs, **words, **c)
        if self.device.type != "cuda":
            self.check_status()
        if staged is not None:
            host = self._read_staged(*staged, "dispatch (waiting for the received counts)")
            self._reject_bad_routing(host, a.num_experts, release=False)
            host_counts = (host[:R], host[R:R + L])
            num_recv = host[R - 1]
            recv_x, recv_topk_idx, recv_meta = recv_x[:num_recv], recv_topk_idx[:num_recv], recv_meta[:num_recv]
            recv_sf = recv_sf[:num_recv] if recv_sf is not None else None
            recv_w = recv_w[:num_recv] if recv_w is not None else None
        return DispatchResult(recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, psum, per_expert,
                              host_counts,
                              layout, psum_per_expert=psum_per_expert, topk_idx_copy=topk_copy,
                              allocations=(recv_x, recv_sf, recv_topk_idx, recv_w) if a.cached is not None
                              else (recv_x, recv_sf, recv_topk_idx, recv_w, recv_meta, info))

    def _broadcast_dispatch(self, T: int, row_bytes: int, num_sf: int, k: int) -> bool:
        """Whether a cached dispatch of plain rows goes by :meth:`_dispatch_broadcast`: switched on
        (``ce_dispatch``), a group of at most ``ce_combine_max_ranks``, ``(R - 1) * T * row_bytes >=
        copy_engine_min_bytes``, rows of a multiple of 16 bytes, and the layout fits the buffer. Every
        rank must decide alike (each gathers from the layout its peers write): nothing here depends
        on this rank's tokens."""
        R = self.num_ranks
        if not self.ce_dispatch or not 1 < R <= self.ce_combine_max_ranks or row_bytes % 16:
            return False
        if self._flag_blocks * _FLAG_GRAIN < T:  # the flag area was sized for fewer tokens
            return False
        if not 0 <= self.copy_engine_min_bytes <= (R - 1) * T * row_bytes:
            return False
        return sizing.broadcast_layout(R, T, row_bytes, num_sf, k)[3] <= self.num_bytes

    def _dispatch_broadcast(self, a: DispatchArgs, outputs: dict, row_bytes: int, programs: int) -> None:
        """Cached dispatch with 0 SMs sending: once every peer released its buffer
        (``primitives.enter``), the copy engine sends ALL of this rank's tokens to every peer (at 2
        ranks with top-8 routing a peer receives ~99.6 % of them anyway): scales, expert ids and
        weights in one copy each, then the rows in chunks, each followed by a copy raising its
        flags (:meth:`_send_chunks`, ``sizing.broadcast_layout``). Meanwhile every program gathers
        the rows this rank receives, each as soon as its chunk's flag is up
        (``dispatch_rows.gather``: the handle's metadata says which source token each row is)."""
        R, T, rank = self.num_ranks, a.num_max_tokens_per_rank, self.rank
        n, k = a.topk_idx.shape

        def dense(t):  # whole rows, 16-byte aligned, so that one copy moves them
            if t is None:
                return None
            t = t.contiguous()
            return t if t.data_ptr() % 16 == 0 else t.clone()

        x, sf, topk, w = dense(a.x), dense(a.sf), dense(a.topk_idx), dense(a.topk_weights)
        num_sf = sf.shape[1] if sf is not None else 0
        layout = sizing.broadcast_layout(R, T, row_bytes, num_sf, k)
        off_sf, off_topk, off_w, _ = layout
        primitives.enter(self.heap.signal_ptrs, self._status, rank, R, self._op_seq, self._ready_word,
                         self._freed_word, self._timeout_ns, primitives.OP_DISPATCH_SEND)
        concurrent = self.device.type == "cuda"
        fork = self._fork() if concurrent else None
        if a.before_epilogue is not None:
            a.before_epilogue()

        def gather():
            dispatch_rows.gather(
                heap=self.heap.data, x=x, sf=sf, topk_idx=topk, topk_weights=w,
                recv_x=outputs["recv_x_words"], recv_sf=outputs["recv_sf"], recv_topk_idx=outputs["recv_topk_idx"],
                recv_topk_weights=outputs["recv_topk_weights"], recv_src_metadata=outputs["recv_src_metadata"],
                psum=a.cached.psum, counter=self._counters[_C_DISPATCH_EPILOGUE:],
                num_local_experts=a.num_experts // R, T=T, broadcast_layout=layout, flags_word=self._flags_word,
                flag_blocks=self._flag_blocks, num_programs=programs, ready_word=self._ready_word,
                freed_word=self._freed_word, **self._common())

        if concurrent:  # the gather first: resident when the first chunk lands
            gather()
        aux = []
        for s in self._peers():
            dst, copies = self.heap.data_addrs[s], []
            for off, t, size in ((off_sf, sf, num_sf * 4), (off_topk, topk, k * 8), (off_w, w, k * 4)):
                if t is not None:
                    copies.append((dst + off + rank * T * size, t.data_ptr(), n * size))
            aux.append(copies)
        self._send_chunks([(s, 0, n) for s in self._peers()], x.data_ptr(), row_bytes, T,
                          self.ce_dispatch_chunk_rows or combine_rows.chunk_rows(T), fork, aux)
        if not concurrent:  # the peers' gathers wait for this rank's copies: they go first here
            gather()
        self._join(fork)

    def _copy_engine_counts(self, psum, row_bytes: int):
        """``psum`` (the received rows' inclusive prefix per source, a host list, or None) when the
        copy engine moves the rows out of the receive slots (see ``copy_engine_min_bytes``), else None."""
        if psum is None or self.copy_engine_min_bytes < 0:
            return None
        own = psum[self.rank] - (psum[self.rank - 1] if self.rank else 0)
        return psum if (psum[-1] - own) * row_bytes >= self.copy_engine_min_bytes else None

    def _copy_out_rows(self, recv_x: torch.Tensor, psum: list, T: int, row_bytes: int, row_pitch: int) -> None:
        """Each peer's rows from its receive region (``sizing.dispatch_rows_layout``: one row every
        ``row_pitch`` bytes, so one dense block when the row is a multiple of 16 bytes) to its output
        rows by the copy engine, queued after the epilogue that moved everything else; then end the
        dispatch: ``freed = seq`` to every peer, so that they may write these slots again."""
        out = recv_x.view(torch.uint8)
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        start = 0
        for s, end in enumerate(psum):
            if s != self.rank:
                copy_engine.copy_rows(out[start:end], self.heap.data, s * T * row_pitch, row_pitch, end - start,
                                      row_bytes, stream)
            start = end
        primitives.release(self.heap.signal_ptrs, self._status, self.num_ranks, self._freed_word + self.rank,
                           self._op_seq)

    def _copy_out_chunk(self, T: int) -> int:
        """Rows per chunk of :meth:`_copy_out_overlapped` (checked before anything is launched)."""
        # (each chunk costs the host a launch and a copy call: at most ~16 chunks over all peers)
        chunk = self.copy_out_chunk_rows or max(combine_rows.chunk_rows(T),
                                                -(-T * (self.num_ranks - 1) // 16 // 64) * 64)
        if chunk <= 0 or chunk % dispatch_rows.BLOCK_TOKENS:  # a chunk must end where a slot counter does
            raise ValueError(f"copy_out_chunk_rows={chunk}: expected a multiple of {dispatch_rows.BLOCK_TOKENS}")
        return chunk

    def _copy_out_overlapped(self, outputs: dict, recv_x: torch.Tensor, host_psum: list, psum: torch.Tensor, T: int,
                             L: int, row_bytes: int, slot_layout: tuple, chunk: int, fork) -> None:
        """The copy-out of :meth:`_copy_out_rows` while the push (queued before, one program fewer
        than the call's ``num_sms``, counting rows into the receivers' slot counters) still runs:
        for each peer, on its side stream of ``fork``, chunks of ``chunk`` rows
        (:meth:`_copy_out_chunk`: an eighth of ``T``, larger from 3 peers on), each a one-program
        ``dispatch_rows.arrivals`` launch (wait for the chunk's rows, bounded; scales and metadata to
        the outputs) then the copy engine's copy of its row data. Then the side streams join and
        ``freed = seq`` goes to every peer. On CPU ranks (``fork`` None) the same steps run in order."""
        out = recv_x.view(torch.uint8)
        sides = fork[1] if fork is not None else [None]
        bounds = [0] + list(host_psum)
        for i, s in enumerate(self._peers()):
            side = sides[i % len(sides)]
            start = bounds[s]
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for r0, rows in combine_rows.chunk_bounds(bounds[s + 1] - start, chunk):
                    dispatch_rows.arrivals(
                        heap_words=self.heap.data.view(torch.int32), signal_ptrs=self.heap.signal_ptrs,
                        status=self._status, psum=psum, recv_sf=outputs["recv_sf"],
                        recv_topk_idx=outputs["recv_topk_idx"], recv_topk_weights=outputs["recv_topk_weights"],
                        recv_src_metadata=outputs["recv_src_metadata"], rank=self.rank, source=s, first=r0, rows=rows,
                        seq_ptr=self._op_seq, num_local_experts=L, T=T, slot_layout=slot_layout,
                        slot_counts_word=self._slot_counts_word, slot_blocks=self._slot_blocks,
                        timeout_ns=self._timeout_ns)
                    copy_engine.copy_rows(out[start + r0:start + r0 + rows], self.heap.data,
                                          (s * T + r0) * slot_layout[0], slot_layout[0], rows, row_bytes,
                                          side.cuda_stream if side is not None else 0)
        self._join(fork)
        primitives.release(self.heap.signal_ptrs, self._status, self.num_ranks, self._freed_word + self.rank,
                           self._op_seq)

    def combine(self, a: CombineArgs):
        n, k = a.topk_idx.shape
        H = a.x.shape[1]
        T = a.num_max_tokens_per_rank
        slot_layout = sizing.combine_slot_layout(H, k)
        c = self._common()
        programs = self._programs(a.num_sms)
        x = a.x if a.x.data_ptr() % 16 == 0 else a.x.clone()  # rows are read as 16-byte vectors
        x_words = x.view(torch.int32)
        out = torch.empty((n, H), dtype=torch.bfloat16, device=self.device)
        out_w = torch.empty((n, k), dtype=torch.float32, device=self.device) if a.topk_weights is not None else None
        words = dict(ready_word=self._ready_word, freed_word=self._freed_word)
        pipelined = (not a.expand and programs >= 2 and self.num_ranks > 1
                     and self._flag_blocks * combine_rows.BLOCK_ROWS >= T)
        copied = self._copied_combine(T, H, k) if not a.expand and programs >= 2 else None
        if copied:
            self._combine_copied(a, x, out, out_w, programs, by_copy_engine=copied == "ce" and a.host_psum is not None)
        elif pipelined:
            if a.before_epilogue is not None:  # the reduction starts with the push: wait first
                a.before_epilogue()
            combine_rows.pipelined(
                x_words=x_words, topk_weights=a.topk_weights, recv_src_metadata=a.recv_src_metadata, psum=a.psum,
                out=out, out_weights=out_w, bias=a.bias, x=x, topk_idx=a.topk_idx,
                dst_buffer_slot_idx=a.layout.dst_buffer_slot_idx, combine_slot_idx=a.layout.combine_slot_idx,
                num_experts=a.num_experts, heap=self.heap.data, data_ptrs=self.heap.data_ptrs,
                counter=self._counters[_C_COMBINE_PUSH:], T=T, slot_layout=slot_layout,
                flags_word=self._flags_word, flag_blocks=self._flag_blocks, num_programs=programs, **words, **c)
        elif not a.expand:
            combine_rows.push(x_words=x_words, topk_weights=a.topk_weights, recv_src_metadata=a.recv_src_metadata,
                              psum=a.psum, heap=self.heap.data, data_ptrs=self.heap.data_ptrs,
                              counter=self._counters[_C_COMBINE_PUSH:],
                              T=T, slot_layout=slot_layout, num_programs=programs, **words, **c)
            if a.before_epilogue is not None:
                a.before_epilogue()
            combine_rows.reduce(out=out, out_weights=out_w, bias=a.bias, x=x, topk_weights=a.topk_weights,
                                psum=a.psum, topk_idx=a.topk_idx, dst_buffer_slot_idx=a.layout.dst_buffer_slot_idx,
                                combine_slot_idx=a.layout.combine_slot_idx, num_experts=a.num_experts,
                                heap=self.heap.data, data_ptrs=self.heap.data_ptrs,
                                counter=self._counters[_C_COMBINE_REDUCE:], T=T,
                                slot_layout=slot_layout, num_programs=programs, **words, **c)
        else:
            per_slot = not a.allow_multiple_reduction
            combine_kernels.push(
                x_words=x_words, topk_weights=a.topk_weights, recv_src_metadata=a.recv_src_metadata, psum=a.psum,
                data_ptrs=self.heap.data_ptrs, counter=self._counters[_C_COMBINE_PUSH:], T=T, slot_layout=slot_layout,
                num_programs=programs, block_words=self._block_words(x_words.shape[1]), expand=True,
                per_slot=per_slot, **words, **c)
            if a.before_epilogue is not None:
                a.before_epilogue()
            combine_kernels.reduce(
                out=out, out_weights=out_w, bias=a.bias, combine_slot_idx=a.layout.combine_slot_idx,
                data_ptrs=self.heap.data_ptrs, counter=self._counters[_C_COMBINE_REDUCE:], T=T,
                slot_layout=slot_layout, num_programs=programs, block_h=self._block_words(H), per_slot=per_slot,
                **words, **c)
        if self.device.type != "cuda":
            self.check_status()
        return out, out_w

    def _copied_combine(self, T: int, H: int, k: int) -> str | None:
        """Whether this combine takes the copy-engine layout (``combine_rows.copied_layout``; it must
        fit the buffer with its flags) and who sends into it: ``"ce"``, the copy engine (ranks whose
        dispatch synced; the others send with SMs), in a group of at most ``ce_combine_max_ranks``
        (``TRITONEP_COPY_ENGINE_COMBINE_MAX_RANKS``) when a rank may send ``copy_engine_min_bytes``
        or more (``(R - 1) * T`` rows); ``"sm"``, SMs on every rank, in larger groups if
        ``copied_above_ce_ranks`` (at 4 ranks, 8192 tokens, graphs: 1049 us against 1138 for the
        pipelined combine, whose layout is by combine slot); ``None``: the pipelined combine. Every
        rank must decide alike (each rank's reduction reads the layout its peers write), so only
        what every rank knows counts, not the host counts."""
        R = self.num_ranks
        if R < 2 or self._flag_blocks * _FLAG_GRAIN < T or combine_rows.copied_layout(R, T, H, k)[1] > self.num_bytes:
            return None
        if R > self.ce_combine_max_ranks:
            return "sm" if self.copied_above_ce_ranks else None
        if 0 <= self.copy_engine_min_bytes <= (R - 1) * T * H * 2:
            return "ce"
        return None

    def _combine_copied(self, a: CombineArgs, x: torch.Tensor, out, out_w, programs: int, by_copy_engine: bool) -> None:
        """The combine with 0 SMs sending: once every peer released its buffer (``primitives.enter``),
        the copy engine sends the rows received from each peer (and their weights) back to it, in
        chunks of ``combine_rows.chunk_rows(T)`` rows, each chunk followed by one copy that raises
        its flags (one per ``combine_rows.FLAG_ROWS`` rows) to -1; meanwhile every program reduces
        tiles of tokens as their rows arrive (``combine_rows.reduce_copied``). On GPUs the copies
        run on side streams, forked after the enter launch and joined before this returns (so CUDA
        graphs capture them). Without ``by_copy_engine`` (no host counts: a dispatch that did not
        sync; or a large group) half of the reduction's programs send the same rows and flags
        instead (``send=True``)."""
        primitives.enter(self.heap.signal_ptrs, self._status, self.rank, self.num_ranks, self._op_seq,
                         self._ready_word, self._freed_word, self._timeout_ns, primitives.OP_COMBINE_SEND)
        # GPU copies run beside the reduction; on CPU ranks every launch and copy runs to its end
        concurrent = self.device.type == "cuda" and by_copy_engine
        stream = torch.cuda.current_stream(self.device).cuda_stream if concurrent else None
        if by_copy_engine:
            self._send_weights_by_copy_engine(a, stream)
        fork = self._fork() if concurrent else None
        if a.before_epilogue is not None:
            a.before_epilogue()
        if concurrent:
            # the reduction first: its programs wait (bounded) for the flags, so it is resident when
            # the first chunk lands instead of after the host has queued every copy
            self._reduce_copied(a, x, out, out_w, programs)
        if by_copy_engine:
            psum = [0] + list(a.host_psum)
            regions = [(s, psum[s], psum[s + 1] - psum[s]) for s in self._peers()]
            self._send_chunks(regions, x.data_ptr(), x.shape[1] * 2, a.num_max_tokens_per_rank,
                              self.ce_chunk_rows or combine_rows.chunk_rows(a.num_max_tokens_per_rank), fork)
        if not concurrent:  # the peers' reductions wait for this rank's copies: they go first here
            self._reduce_copied(a, x, out, out_w, programs, send=not by_copy_engine)
        self._join(fork)

    def _send_weights_by_copy_engine(self, a: CombineArgs, stream) -> None:
        """Each peer's weights (``[rows, k]`` float32, a few hundred KB) in one copy on ``stream``
        before the side streams fork: every flag the row copies raise then follows them too, and
        the side streams carry one small copy per chunk (the flag) instead of two."""
        w = a.topk_weights
        if w is None or a.host_psum is None:
            return
        R, T, rank, k = self.num_ranks, a.num_max_tokens_per_rank, self.rank, w.shape[1]
        w_off, _ = combine_rows.copied_layout(R, T, a.x.shape[1], k)
        start = 0
        for s, end in enumerate(a.host_psum):
            if s != rank:
                copy_engine.copy_bytes(self.heap.data_addrs[s] + w_off + rank * T * k * 4, w.data_ptr() + start * k * 4,
                                       (end - start) * k * 4, stream)
            start = end

    def _peers(self) -> list:
        """The other ranks, starting after this one (so that no peer is everyone's first)."""
        return [(self.rank + i) % self.num_ranks for i in range(1, self.num_ranks)]

    def _fork(self):
        """Side streams for copy-engine sends (``ce_side_streams``; 0: one per peer), forked from the
        current stream here. Returns ``(current stream, side streams)`` for :meth:`_join`."""
        R = self.num_ranks
        lanes = min(R - 1, self.ce_side_streams or R - 1)
        if self._ce_streams is None or len(self._ce_streams) != lanes:
            self._ce_streams = [torch.cuda.Stream(device=self.device) for _ in range(lanes)]
            self._ce_events = [torch.cuda.Event() for _ in range(lanes + 1)]
        current = torch.cuda.current_stream(self.device)
        self._ce_events[lanes].record(current)
        for side in self._ce_streams:
            side.wait_event(self._ce_events[lanes])
        return current, self._ce_streams

    def _join(self, fork) -> None:
        if fork is None:
            return
        current, sides = fork
        for event, side in zip(self._ce_events, sides):
            event.record(side)
            current.wait_event(event)

    def _send_chunks(self, regions: list, src_addr: int, row_bytes: int, T: int, chunk: int, fork,
                     aux: list | None = None) -> None:
        """Copy-engine sends of :meth:`_combine_copied` and :meth:`_dispatch_broadcast`: for each
        ``(peer, first row, rows)`` of ``regions``, rows from ``src_addr`` (``row_bytes`` apart) to
        the peer's data area at row ``rank * T + r`` in chunks (``combine_rows.chunk_bounds``), each
        followed by the flags of its blocks of ``FLAG_ROWS`` rows (``flags[rank][block] = -1`` in the
        peer's signal area). ``aux[i]``: ``(dst, src, bytes)`` copies to send to region ``i``'s peer
        before its first chunk. Chunk-major over the peers (every peer's first chunk first); on GPUs
        the ``i``-th region's on side stream ``i % len(sides)`` of ``fork`` (from :meth:`_fork`),
        else by the host at once."""
        rank = self.rank
        sides = fork[1] if fork is not None else [None]
        flag_src = self._minus_one.data_ptr()
        flag_rows = combine_rows.FLAG_ROWS
        for i, copies in enumerate(aux or ()):
            side = sides[i % len(sides)]
            for dst, src, nbytes in copies:
                copy_engine.copy_bytes(dst, src, nbytes, side and side.cuda_stream)
        bounds = [combine_rows.chunk_bounds(count, chunk) for _, _, count in regions]
        for c in range(max(map(len, bounds), default=0)):
            for i, (s, start, count) in enumerate(regions):
                if c >= len(bounds[i]):
                    continue
                r0, rows = bounds[i][c]
                side = sides[i % len(sides)]
                copy_engine.copy_bytes(self.heap.data_addrs[s] + (rank * T + r0) * row_bytes,
                                       src_addr + (start + r0) * row_bytes, rows * row_bytes, side and side.cuda_stream)
                # the flags of every block of FLAG_ROWS rows that this copy completes (r0 is a multiple)
                first, last = r0 // flag_rows, -(-(r0 + rows) // flag_rows)
                flags = self.heap.signal_addrs[s] + 4 * (self._flags_word + rank * self._flag_blocks + first)
                copy_engine.copy_bytes(flags, flag_src, 4 * (last - first), side and side.cuda_stream)

    def _reduce_copied(self, a: CombineArgs, x: torch.Tensor, out, out_w, programs: int, send: bool = False) -> None:
        combine_rows.reduce_copied(
            out=out, out_weights=out_w, bias=a.bias, x=x, topk_weights=a.topk_weights, psum=a.psum,
            topk_idx=a.topk_idx, dst_buffer_slot_idx=a.layout.dst_buffer_slot_idx,
            combine_slot_idx=a.layout.combine_slot_idx, num_experts=a.num_experts, heap=self.heap.data,
            data_ptrs=self.heap.data_ptrs, send=send, tile=self.ce_reduce_tile, send_tile=self.combine_send_tile,
            send_prefetch=self.combine_send_prefetch,
            counter=self._counters[_C_COMBINE_REDUCE:], T=a.num_max_tokens_per_rank, flags_word=self._flags_word,
            flag_blocks=self._flag_blocks, num_programs=programs, ready_word=self._ready_word,
            freed_word=self._freed_word, **self._common())

    def barrier(self, sync: bool = True) -> None:
        primitives.barrier(self.heap.signal_ptrs, self._status, self.rank, self.num_ranks, self._op_seq,
                           self._ready_word, self._freed_word, self._timeout_ns)
        if sync:
            self._host_wait("barrier")
            self.check_status()

    def destroy(self) -> None:
        self.heap.destroy()
