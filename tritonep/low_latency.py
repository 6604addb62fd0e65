"""V1's low-latency mode: the state a ``Buffer(low_latency_mode=True)`` keeps and its two calls.

A heap of ``num_rdma_bytes`` (mapped by every rank of the host) holds two halves; dispatches take
the halves in turn, and so do combines (V1's rule: at most two operations of a kind outstanding,
i.e. a receive hook must run before the call after next of its kind is sent). A half holds
``[S: E x T bf16 rows | D: E x T messages | C: k x T bf16 rows]``: the zero-copy send rows
(``get_next_low_latency_combine_buffer``), the dispatch's receive messages, the combine's receive
rows.
The kernels are :mod:`tritonep.kernels.low_latency`; the ranks' operations are numbered on the
device per (kind, half), so CUDA graphs replay them.

Outputs (spec 8.5): ``recv_x`` ``[L, R*T, H]`` (bf16, or fp8 with float32 scales ``[L, R*T, H/128]``
/ UE8M0 int32 ``[L, R*T, H/512]``, both column-major in the last two dimensions); expert ``l``'s
first ``recv_count[l]`` rows are valid, by source rank then source token; ``handle = (src_info
[L, R*T] int32, layout_range [L, R] int64 = begin << 32 | count, T, H, E)``.

Bounded outputs (tritonep): ``num_max_recv_tokens_per_expert=M`` gives every output ``M`` rows per
expert instead of ``R*T``. No row past ``M`` is written; if an expert of any rank gets more, every
rank records ``OP_RECV_OVERFLOW`` at that dispatch (the receive's last programs exchange the ranks'
verdicts), its kernels do nothing from then on, and every call raises ``RecvOverflowError`` until
every rank calls ``Buffer.clear_overflow()``.
"""
from __future__ import annotations

import dataclasses

import torch

from . import checks, sizing, streams
from .errors import OP_RECV_OVERFLOW, raise_recorded
from .handle import EventOverlap
from .status import StatusWords
from .heap import create_heap
from .kernels import low_latency as kernels

#: the most experts a low-latency call may have (the signal words are allocated for it)
MAX_EXPERTS = 4096
#: signal words of a half: counts, dispatch flags, combine flags, verdicts and their flags
WORDS_PER_HALF = 5 * MAX_EXPERTS


def _align(v: int, a: int = 16) -> int:
    return -(-v // a) * a


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte offsets of one call in its half (see the module docstring) and its signal words."""

    msg_bytes: int
    off_sf: int
    off_tail: int
    num_sf: int
    combine_area: int
    send_area: int
    dispatch_area: int
    end: int
    count_word: int
    dispatch_flag_word: int
    combine_flag_word: int
    over_word: int
    announced_word: int

    @staticmethod
    def of(half: int, half_bytes: int, T: int, H: int, E: int, k: int, fp8: bool) -> "Layout":
        num_sf = H // 128 if fp8 else 0
        x_bytes = H if fp8 else 2 * H
        msg = _align(x_bytes + 4 * num_sf + 8)
        # every offset but the end is independent of k and of FP8 (the dispatch area is sized for
        # bf16 messages): calls of both kinds may use one half at the same time
        base = half * half_bytes
        s = base
        d = s + _align(E * T * 2 * H, 256)
        c = d + _align(E * T * _align(2 * H + 8), 256)
        end = c + k * T * 2 * H
        words = half * WORDS_PER_HALF  # (a rank count never exceeds MAX_EXPERTS)
        return Layout(msg, x_bytes, x_bytes + 4 * num_sf, num_sf, c, s, d, end - base, words,
                      words + MAX_EXPERTS, words + 2 * MAX_EXPERTS, words + 3 * MAX_EXPERTS, words + 4 * MAX_EXPERTS)


def heap_bytes(T: int, H: int, E: int, k: int = 32) -> int:
    """``num_rdma_bytes`` tritonep's low-latency mode needs: two halves of ``Layout.end``."""
    return 2 * _align(Layout.of(0, 0, T, H, E, k, False).end, sizing.ALIGNMENT)


class LLHandle(tuple):
    """``(src_info, layout_range, T, H, E)`` as V1's; ``.slot_info`` ``[L, rows]`` int32 (the top-k
    slot of each row at its origin), ``.rows`` (per expert: ``R*T`` unless capped), ``.layout`` and
    ``.owner`` for tritonep."""

    def __new__(cls, items, slot_info, layout, owner):
        obj = super().__new__(cls, items)
        obj.slot_info, obj.layout, obj.owner = slot_info, layout, owner
        obj.rows = slot_info.shape[1]
        return obj


class LowLatency:
    def __init__(self, group, num_bytes: int, device: torch.device, timeout_s: float, owner_id: int,
                 shrink: bool = False):
        import torch.distributed as dist

        self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.device, self.owner = group, device, owner_id
        self.timeout_s = timeout_s
        self.heap = create_heap(group, num_bytes, 2 * WORDS_PER_HALF, device)
        self.half_bytes = num_bytes // 2 // 256 * 256
        self.seq = torch.zeros(4, dtype=torch.int32, device=device)  # per (kind, half): last operation
        self.counters = torch.zeros(4, dtype=torch.int32, device=device)
        self.status_words = StatusWords(device)  # (see tritonep.status)
        self.status = self.status_words.tensor
        # the send launches' scratch, left zero by each: dispatch's program counter and rows per
        # expert, combine's program counter per (expert, origin)
        self.send_counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.send_counts = torch.zeros(MAX_EXPERTS, dtype=torch.int32, device=device)
        self.pair_counters = torch.zeros(MAX_EXPERTS, dtype=torch.int32, device=device)
        self.peak = torch.zeros(1, dtype=torch.int32, device=device)  # a capped receive's most rows per expert
        # shrink mode: nonzero for a rank left out (set by the user, or by a wait for it that timed out)
        self.mask = torch.zeros(self.num_ranks, dtype=torch.int32, device=device) if shrink else None
        self.halves = [0, 0]  # the next half of each kind

    def _take(self, kind: int) -> int:
        h = self.halves[kind]
        self.halves[kind] ^= 1
        return h

    def _layout(self, half: int, T: int, H: int, E: int, k: int, fp8: bool) -> Layout:
        layout = Layout.of(half, self.half_bytes, T, H, E, k, fp8)
        if layout.end > self.half_bytes:
            need = 2 * layout.end
            raise ValueError(f"low-latency calls of {T} tokens per rank, hidden {H}, {E} experts, top-{k} need "
                             f"{need} bytes of num_rdma_bytes; this Buffer has {2 * self.half_bytes} (size it "
                             "with Buffer.get_low_latency_rdma_size_hint)")
        return layout

    def _check(self) -> None:
        """On CPU ranks every launch has run: raise a wait that timed out."""
        if self.device.type != "cuda":
            raise_recorded(self.status.tolist(), self.rank, self.timeout_s, "low-latency operation")

    def dispatch(self, x, topk_idx, T: int, E: int, stats, wait_stats, use_fp8: bool, round_scale: bool,
                 use_ue8m0: bool, async_finish: bool, return_recv_hook: bool, rows: int | None = None):
        """``rows``: output rows per local expert (``R*T``, the worst case, when None)."""
        R, dev = self.num_ranks, self.device
        n, H = x.shape
        k = topk_idx.shape[1]
        L = E // R
        half = self._take(0)
        layout = self._layout(half, T, H, E, k, use_fp8)
        rows = output_rows(R, T, rows)
        recv_x = torch.empty((L, rows, H), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
        recv_sf = None
        if use_fp8:  # column-major in the last two dimensions
            recv_sf = (torch.empty((L, H // 512, rows), dtype=torch.int32, device=dev) if use_ue8m0 else
                       torch.empty((L, H // 128, rows), dtype=torch.float32, device=dev)).transpose(1, 2)
        src_info = torch.empty((L, rows), dtype=torch.int32, device=dev)
        slot_info = torch.empty((L, rows), dtype=torch.int32, device=dev)
        layout_range = torch.empty((L, R), dtype=torch.int64, device=dev)
        recv_count = torch.empty(L, dtype=torch.int32, device=dev)
        timeout_ns = int(self.timeout_s * 1e9)
        seq, counter = self.seq[half:half + 1], self.counters[half:half + 1]

        def send():
            kernels.dispatch_send(x=x, topk_idx=topk_idx, heap=self.heap, seq=seq, counter=self.send_counter,
                                  counts=self.send_counts, status=self.status, mask=self.mask, rank=self.rank,
                                  num_local_experts=L, num_ranks=R, T=T, layout=layout, quantize=use_fp8,
                                  round_scale=round_scale)

        def recv():
            kernels.dispatch_recv(recv_x=recv_x, recv_sf=recv_sf, src_info=src_info, slot_info=slot_info,
                                  layout_range=layout_range, recv_count=recv_count, stats=stats,
                                  wait_stats=wait_stats, heap=self.heap, seq=seq, counter=counter, peak=self.peak,
                                  status=self.status, mask=self.mask, rank=self.rank, num_ranks=R, T=T,
                                  layout=layout, timeout_ns=timeout_ns, ue8m0=use_ue8m0)
            self._check()

        handle = LLHandle((src_info, layout_range, T, H, E), slot_info, layout, self.owner)
        out = (recv_x, recv_sf) if use_fp8 else recv_x
        outputs = (recv_x, recv_sf, src_info, slot_info, layout_range, recv_count)
        event, hook = self._run(send, recv, async_finish, return_recv_hook, (x, topk_idx, stats, wait_stats), outputs)
        return out, recv_count, handle, event, hook

    def combine(self, y, topk_idx, topk_weights, handle: LLHandle, zero_copy: bool, async_finish: bool,
                return_recv_hook: bool, out, wait_stats):
        src_info, layout_range, T, H, E = handle
        R, dev = self.num_ranks, self.device
        n, k = topk_idx.shape
        half = self._take(1)
        layout = self._layout(half, T, H, E, k, False)
        if zero_copy:  # the rows are where get_next_low_latency_combine_buffer put them
            y = self._send_view(layout, E // R, handle.rows, H)
        if out is None:
            out = torch.empty((n, H), dtype=torch.bfloat16, device=dev)
        timeout_ns = int(self.timeout_s * 1e9)
        seq, counter = self.seq[2 + half:3 + half], self.counters[2 + half:3 + half]

        def send():
            kernels.combine_send(y=y, layout_range=layout_range, src_info=src_info, slot_info=handle.slot_info,
                                 heap=self.heap, seq=seq, counters=self.pair_counters, status=self.status,
                                 mask=self.mask, rank=self.rank, num_ranks=R, T=T, layout=layout)

        def recv():
            kernels.combine_recv(out=out, topk_idx=topk_idx, topk_weights=topk_weights, heap=self.heap, seq=seq,
                                 counter=counter, status=self.status, mask=self.mask, wait_stats=wait_stats,
                                 rank=self.rank,
                                 num_ranks=R, num_local_experts=E // R, T=T, layout=layout, timeout_ns=timeout_ns)
            self._check()

        event, hook = self._run(send, recv, async_finish, return_recv_hook,
                                (y, topk_idx, topk_weights, *handle[:2], handle.slot_info, wait_stats), (out,))
        return out, event, hook

    def next_combine_buffer(self, handle: LLHandle) -> torch.Tensor:
        """``[L, rows, H]`` bf16 (the handle's rows per expert): where the next combine reads its rows
        with ``zero_copy=True``."""
        _, _, T, H, E = handle
        layout = self._layout(self.halves[1], T, H, E, 1, False)
        return self._send_view(layout, E // self.num_ranks, handle.rows, H)

    def _send_view(self, layout: Layout, L: int, rows: int, H: int) -> torch.Tensor:
        """``[L, rows, H]`` bf16: the send area (sized for ``R*T`` rows per expert)."""
        area = self.heap.data[layout.send_area:layout.send_area + L * rows * H * 2]
        return area.view(torch.bfloat16).view(L, rows, H)

    def _run(self, send, recv, async_finish: bool, return_recv_hook: bool, inputs, outputs):
        """Send now and receive now or in the hook; on the comm stream with ``async_finish``."""
        if return_recv_hook:
            send()
            self._check()
            return EventOverlap(), recv
        if async_finish:
            compute = streams.enter(self.device, None)
            try:
                send()
                recv()
            finally:
                streams.leave(compute)
            return streams.finish(self.device, True, inputs=inputs, outputs=outputs, compute=compute), None
        send()
        recv()
        return EventOverlap(), None

    # -- shrink mode: ranks left out ------------------------------------------------------
    def _shrink_mask(self) -> torch.Tensor:
        if self.mask is None:
            raise ValueError("the mask buffer needs Buffer(..., enable_shrink=True)")
        return self.mask

    def update_mask(self, rank: int, mask: bool) -> None:
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} is not in 0..{self.num_ranks - 1}")
        self._shrink_mask()[rank] = int(bool(mask))

    def query_mask(self, out: torch.Tensor) -> None:
        m = self._shrink_mask()
        if out.dtype != torch.int32 or tuple(out.shape) != (self.num_ranks,):
            raise ValueError(f"mask_status must be [{self.num_ranks}] int32")
        out.copy_(m)

    def clean_mask(self) -> None:
        self._shrink_mask().zero_()

    def clean(self, overflow: bool = False) -> None:
        """Collective: every rank forgets its operation numbers and zeroes its flags (V1's
        ``clean_low_latency_buffer``): after it the ranks count from 1 again, together. With
        ``overflow`` also the status of a capped dispatch that overflowed (``RecvOverflowError``;
        every rank recorded it at the same dispatch); a timeout is raised again instead (a peer's
        state is unknown)."""
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        status = self.status.tolist()
        if overflow and status[0] not in (0, OP_RECV_OVERFLOW):
            raise_recorded(status, self.rank, self.timeout_s, "low-latency operation")
        dist.barrier(group=self.group)
        self.heap.signals.zero_()
        for scratch in (self.send_counter, self.send_counts, self.pair_counters, self.peak):
            scratch.zero_()
        if overflow and status[0]:
            self.status[:4].zero_()
            self.status_words.host.zero_()
        self.seq.zero_()
        self.counters.zero_()
        self.halves = [0, 0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)

    def destroy(self) -> None:
        self.heap.destroy()


def output_rows(R: int, T: int, rows: int | None) -> int:
    """Rows per local expert of a low-latency dispatch's outputs: ``num_max_recv_tokens_per_expert``
    (``rows``), at most the worst case ``R * T`` (its value when None)."""
    return R * T if rows is None else min(rows, R * T)


def check_dispatch(x, topk_idx, T: int, E: int, R: int, use_fp8: bool, use_ue8m0: bool, round_scale: bool,
                   async_finish: bool, return_recv_hook: bool, stats, wait_stats, device, rows=None) -> None:
    """V1's checks of ``low_latency_dispatch`` (spec 8.5), and of tritonep's
    ``num_max_recv_tokens_per_expert`` (``rows``), before anything moves."""
    checks.require_tensor("x", x, 2, device)
    if x.dtype != torch.bfloat16:
        raise TypeError(f"low_latency_dispatch's x must be torch.bfloat16, got {x.dtype}")
    checks.require_contiguous("x", x)
    n, H = x.shape
    if H % 128:
        raise ValueError(f"hidden ({H}) must be a multiple of 128")
    if n > T:
        raise ValueError(f"x has {n} tokens, more than num_max_dispatch_tokens_per_rank ({T})")
    if E % R or E > MAX_EXPERTS:
        raise ValueError(f"num_experts ({E}) must be a multiple of the {R} ranks and at most {MAX_EXPERTS}")
    if (R * T) % 4:
        raise ValueError(f"num_ranks x num_max_dispatch_tokens_per_rank ({R * T}) must be a multiple of 4")
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1 or rows % 4):
        raise ValueError(f"num_max_recv_tokens_per_expert must be a positive multiple of 4 (the scales' "
                         f"column-major rows), got {rows!r}")
    if use_fp8 and H % 512:
        raise ValueError(f"FP8 low-latency dispatch needs hidden ({H}) to be a multiple of 512")
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0 needs round_scale=True")
    if use_ue8m0 and not use_fp8:
        raise ValueError("use_ue8m0 needs use_fp8=True")
    if async_finish and return_recv_hook:
        raise ValueError("async_finish and return_recv_hook cannot both be set")
    checks.require_tensor("topk_idx", topk_idx, 2, device)
    if topk_idx.shape[0] != n or topk_idx.dtype != checks.topk_idx_t:
        raise ValueError(f"topk_idx must be [{n}, k] {checks.topk_idx_t}, got {list(topk_idx.shape)} {topk_idx.dtype}")
    checks.require_contiguous("topk_idx", topk_idx)
    if stats is not None:
        checks.check_stats(stats, E // R, device)
    if wait_stats is not None and (wait_stats.dtype != torch.int64 or tuple(wait_stats.shape) != (R,)):
        raise ValueError(f"dispatch_wait_recv_cost_stats must be [{R}] int64")


def check_combine(x, topk_idx, topk_weights, handle, owner: int, use_logfmt: bool, zero_copy: bool,
                  async_finish: bool, return_recv_hook: bool, out, wait_stats, R: int, device) -> None:
    """V1's checks of ``low_latency_combine`` (spec 8.5), before anything moves."""
    if not isinstance(handle, LLHandle) or handle.owner != owner:
        raise ValueError("handle must come from this Buffer's low_latency_dispatch")
    if use_logfmt:
        raise NotImplementedError("use_logfmt (LogFMT-compressed combine) is not supported by tritonep")
    if async_finish and return_recv_hook:
        raise ValueError("async_finish and return_recv_hook cannot both be set")
    _, _, T, H, E = handle
    checks.require_tensor("topk_idx", topk_idx, 2, device)
    n = topk_idx.shape[0]
    checks.require_weights(topk_weights, tuple(topk_idx.shape), device)
    if not zero_copy:
        checks.require_tensor("x", x, 3, device)
        if x.dtype != torch.bfloat16 or tuple(x.shape) != (E // R, handle.rows, H):
            raise ValueError(f"x must be [{E // R}, {handle.rows}, {H}] bf16, got {list(x.shape)} {x.dtype}")
        checks.require_contiguous("x", x)
    if n > T:
        raise ValueError(f"topk_idx has {n} tokens, more than the handle's {T}")
    if out is not None and (tuple(out.shape) != (n, H) or out.dtype != torch.bfloat16):
        raise ValueError(f"out must be [{n}, {H}] bf16")
    if wait_stats is not None and (wait_stats.dtype != torch.int64 or tuple(wait_stats.shape) != (R,)):
        raise ValueError(f"combine_wait_recv_cost_stats must be [{R}] int64")
