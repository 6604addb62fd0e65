"""The bad-input table: every input a public call rejects, the exception and a fragment of its
message, and a run that proves each rejection comes before any byte of any heap changes and that
every rank's next valid call still works. docs/errors.md is this table
(``python -m tritonep.testing.bad_inputs`` prints it; a test keeps the two equal)."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import torch

T, H, E, K = 16, 128, 8, 2  # EP shapes of the run (2 ranks)
LL_T, LL_H = 8, 512


@dataclasses.dataclass(frozen=True)
class Row:
    api: str
    condition: str
    exc: type
    match: str
    call: Callable
    family: str  # the valid call that runs after it: ep, pp, agrs, engram, v1, ll
    session: bool = False  # made inside an open AGRS session (opened and closed around the check)
    counts: bool = False  # checked on the device: the layout kernel's counts reach the peers first, no row


def _d(c, **kw):
    args = dict(x=c.x, topk_idx=c.topk, topk_weights=c.w, num_experts=E)
    args.update(kw)
    return c.ep.dispatch(args.pop("x"), **args)


def _ll(c, **kw):
    args = dict(x=c.llx, topk_idx=c.lltopk, num_max_dispatch_tokens_per_rank=LL_T, num_experts=c.llE,
                use_fp8=True)
    args.update(kw)
    return c.v1.low_latency_dispatch(**args)


def _v1d(c, **kw):
    args = dict(x=c.x, num_tokens_per_rank=c.layout[0], is_token_in_rank=c.layout[3],
                num_tokens_per_expert=c.layout[2], topk_idx=c.topk, topk_weights=c.w)
    args.update(kw)
    return c.v1.dispatch(**args)


bf = torch.bfloat16
ROWS = [
    # ElasticBuffer.dispatch
    Row("ElasticBuffer.dispatch", "x not bf16 (nor an FP8 pair)", TypeError, "bfloat16",
        lambda c: _d(c, x=c.x.float()), "ep"),
    Row("ElasticBuffer.dispatch", "x not 2-D", ValueError, "2-D", lambda c: _d(c, x=c.x[None]), "ep"),
    Row("ElasticBuffer.dispatch", "x not contiguous", ValueError, "contiguous",
        lambda c: _d(c, x=torch.zeros(T, 2 * H, dtype=bf)[:, ::2]), "ep"),
    Row("ElasticBuffer.dispatch", "more tokens than num_max_tokens_per_rank", ValueError,
        "more than num_max_tokens_per_rank", lambda c: _d(c, x=torch.zeros(T + 1, H, dtype=bf),
                                                          topk_idx=torch.zeros(T + 1, K, dtype=torch.int64),
                                                          topk_weights=None), "ep"),
    Row("ElasticBuffer.dispatch", "hidden other than the buffer's", ValueError, "hidden=128",
        lambda c: _d(c, x=torch.zeros(T, 2 * H, dtype=bf)), "ep"),
    Row("ElasticBuffer.dispatch", "topk_idx not int64", TypeError, "topk_idx must be torch.int64",
        lambda c: _d(c, topk_idx=c.topk.int()), "ep"),
    Row("ElasticBuffer.dispatch", "topk_idx rows differ from x's", ValueError, "rows",
        lambda c: _d(c, topk_idx=c.topk[:-1]), "ep"),
    Row("ElasticBuffer.dispatch", "an expert id >= num_experts", ValueError, f"expert id {E}",
        lambda c: _d(c, topk_idx=torch.where(c.topk == 0, E, c.topk)), "ep", counts=True),
    Row("ElasticBuffer.dispatch", "an expert twice in a row", ValueError, "same expert twice",
        lambda c: _d(c, topk_idx=torch.stack([c.topk[:, 0], c.topk[:, 0]], 1)), "ep", counts=True),
    Row("ElasticBuffer.dispatch", "num_experts not divisible by the ranks", ValueError,
        "divisible by the number of ranks", lambda c: _d(c, num_experts=E + 1), "ep"),
    Row("ElasticBuffer.dispatch", "topk_weights not float32", TypeError, "topk_weights must be torch.float32",
        lambda c: _d(c, topk_weights=c.w.double()), "ep"),
    Row("ElasticBuffer.dispatch", "topk_weights of another shape", ValueError, "topk_weights must be",
        lambda c: _d(c, topk_weights=c.w[:, :1].contiguous()), "ep"),
    Row("ElasticBuffer.dispatch", "FP8 scales not 4-byte", TypeError, "4-byte",
        lambda c: _d(c, x=(c.x.to(torch.float8_e4m3fn), torch.ones(T, 1, dtype=torch.float16))), "ep"),
    Row("ElasticBuffer.dispatch", "no topk_idx and no handle", ValueError, "topk_idx",
        lambda c: c.ep.dispatch(c.x, num_experts=E), "ep"),
    Row("ElasticBuffer.dispatch", "do_zero_padding without do_expand", ValueError, "do_zero_padding requires do_expand",
        lambda c: _d(c, do_zero_padding=True), "ep"),
    Row("ElasticBuffer.dispatch", "previous_event without allocate_on_comm_stream", ValueError,
        "allocate_on_comm_stream", lambda c: _d(c, previous_event=c.ep.capture()), "ep"),
    Row("ElasticBuffer.dispatch", "expert_alignment < 1", ValueError, "expert_alignment",
        lambda c: _d(c, expert_alignment=0), "ep"),
    Row("ElasticBuffer.dispatch", "num_max_recv_tokens < 1", ValueError, "num_max_recv_tokens",
        lambda c: _d(c, do_cpu_sync=False, num_max_recv_tokens=0), "ep"),
    Row("ElasticBuffer.dispatch", "counters not int32", TypeError, "int32",
        lambda c: _d(c, cumulative_local_expert_recv_stats=torch.zeros(E // 2, dtype=torch.int64)), "ep"),
    Row("ElasticBuffer.dispatch", "a handle of another buffer", ValueError, "another ElasticBuffer",
        lambda c: c.ep.dispatch(c.x, handle=c.other_handle), "ep"),
    Row("ElasticBuffer.dispatch", "cached dispatch given topk_idx", ValueError, "takes no topk_idx",
        lambda c: c.ep.dispatch(c.x, topk_idx=c.topk, handle=c.handle), "ep"),
    Row("ElasticBuffer.dispatch", "cached dispatch with do_cpu_sync=True", ValueError, "never syncs",
        lambda c: c.ep.dispatch(c.x, handle=c.handle, do_cpu_sync=True), "ep"),
    Row("ElasticBuffer.dispatch", "cached dispatch of another token count", ValueError, "tokens",
        lambda c: c.ep.dispatch(c.x[:-1], handle=c.handle), "ep"),
    # ElasticBuffer.combine
    Row("ElasticBuffer.combine", "rows other than the dispatch returned", ValueError, "rows",
        lambda c: c.ep.combine(torch.zeros(c.handle.num_recv_tokens + 1, H, dtype=bf), c.handle), "ep"),
    Row("ElasticBuffer.combine", "x not bf16", TypeError, "bfloat16",
        lambda c: c.ep.combine(c.y.float(), c.handle), "ep"),
    Row("ElasticBuffer.combine", "a bias of another shape", ValueError, "bias[0]",
        lambda c: c.ep.combine(c.y, c.handle, bias=torch.zeros(T + 1, H, dtype=bf)), "ep"),
    Row("ElasticBuffer.combine", "not an EPHandle", TypeError, "EPHandle",
        lambda c: c.ep.combine(c.y, handle=None), "ep"),
    Row("ElasticBuffer.combine", "a handle of another buffer", ValueError, "another ElasticBuffer",
        lambda c: c.ep.combine(c.y, c.other_handle), "ep"),
    # pipeline send/recv
    Row("ElasticBuffer.pp_set_config", "a size or slot count < 1", ValueError, "positive",
        lambda c: c.ep.pp_set_config(0, 2), "pp"),
    Row("ElasticBuffer.pp_set_config", "bytes x slots x 4 > num_bytes", ValueError, "get_pp_buffer_size_hint",
        lambda c: c.ep.pp_set_config(c.ep.num_bytes, 2), "pp"),
    Row("ElasticBuffer.pp_send", "not a multiple of 32 bytes", ValueError, "multiple of 32",
        lambda c: c.ep.pp_send(torch.zeros(9), c.next), "pp"),
    Row("ElasticBuffer.pp_send", "more bytes than configured", ValueError, "at most",
        lambda c: c.ep.pp_send(torch.zeros(2048), c.next), "pp"),
    Row("ElasticBuffer.pp_send", "not contiguous", ValueError, "contiguous",
        lambda c: c.ep.pp_send(torch.zeros(32)[::2], c.next), "pp"),
    Row("ElasticBuffer.pp_recv", "a peer that is not a ring neighbour", ValueError, "neighbour",
        lambda c: c.ep.pp_recv(torch.zeros(8), c.rank + 5), "pp"),
    # all-gather sessions
    Row("ElasticBuffer.all_gather", "no session open", ValueError, "no AGRS session",
        lambda c: c.ep.all_gather(torch.zeros(8)), "agrs"),
    Row("ElasticBuffer.destroy_agrs_session", "no session open", ValueError, "no AGRS session",
        lambda c: c.ep.destroy_agrs_session(), "agrs"),
    Row("ElasticBuffer.agrs_set_config", "more than 32 calls per session", ValueError, "at most 32",
        lambda c: c.ep.agrs_set_config(1024, 33), "agrs"),
    Row("ElasticBuffer.agrs_set_config", "more session bytes than num_bytes", ValueError, "get_agrs_buffer_size_hint",
        lambda c: c.ep.agrs_set_config(c.ep.num_bytes + 32, 2), "agrs"),
    Row("ElasticBuffer.create_agrs_session", "a session already open", ValueError, "already open",
        lambda c: c.ep.create_agrs_session(), "agrs", session=True),
    Row("ElasticBuffer.all_gather", "an empty list", ValueError, "no tensor", lambda c: c.ep.all_gather([]), "agrs",
        session=True),
    Row("ElasticBuffer.all_gather", "a tensor not contiguous", ValueError, "contiguous",
        lambda c: c.ep.all_gather(torch.zeros(8, 8).T), "agrs", session=True),
    Row("ElasticBuffer.all_gather", "more bytes than the session holds", ValueError, "flush",
        lambda c: c.ep.all_gather(torch.zeros(1 << 16)), "agrs", session=True),
    Row("ElasticBuffer.all_gather", "an in-place tensor out of its place", ValueError, "in-place tensor",
        lambda c: c.ep.all_gather([torch.zeros(4), c.ep.agrs_get_inplace_tensor((4,), torch.float32)]), "agrs",
        session=True),
    Row("ElasticBuffer.reduce_scatter", "t not [R, ...]", ValueError, "a slice per rank",
        lambda c: c.ep.reduce_scatter(torch.zeros(3, 4)), "agrs", session=True),
    Row("ElasticBuffer.reduce_scatter", "t not contiguous", ValueError, "contiguous",
        lambda c: c.ep.reduce_scatter(torch.zeros(4, 2).T), "agrs", session=True),
    # Engram
    Row("ElasticBuffer.engram_write", "storage not bf16 or FP8", ValueError, "bf16 or float8",
        lambda c: c.ep.engram_write(torch.zeros(8, H)), "engram"),
    Row("ElasticBuffer.engram_write", "FP8 storage without sf", ValueError, "sf must be given",
        lambda c: c.ep.engram_write(torch.zeros(8, H, dtype=torch.float8_e4m3fn)), "engram"),
    Row("ElasticBuffer.engram_write", "more bytes than num_cpu_bytes", ValueError, "num_cpu_bytes",
        lambda c: c.ep.engram_write(torch.zeros(c.ep.num_cpu_bytes // (2 * H) + 8, H, dtype=bf)), "engram"),
    Row("ElasticBuffer.engram_fetch", "indices not int32", ValueError, "int32",
        lambda c: c.ep.engram_fetch(torch.zeros(2, 2, dtype=torch.int64)), "engram"),
    Row("ElasticBuffer.engram_fetch", "more rows than the GPU part holds", ValueError, "GPU part",
        lambda c: c.ep.engram_fetch(torch.zeros(c.ep.num_bytes // (2 * H) + 1, 1, dtype=torch.int32)), "engram"),
    # DeepEP V1's Buffer, normal mode
    Row("Buffer.dispatch", "no layout tensors and no handle", ValueError, "needs num_tokens_per_rank",
        lambda c: c.v1.dispatch(c.x, topk_idx=c.topk, topk_weights=c.w), "v1"),
    Row("Buffer.dispatch", "topk_idx without topk_weights", ValueError, "together",
        lambda c: _v1d(c, topk_weights=None), "v1"),
    Row("Buffer.dispatch", "is_token_in_rank of another shape", ValueError, "is_token_in_rank must be",
        lambda c: _v1d(c, is_token_in_rank=c.layout[3][:-1]), "v1"),
    Row("Buffer.dispatch", "cached dispatch given topk_idx", ValueError, "takes no topk_idx",
        lambda c: c.v1.dispatch(c.x, handle=c.v1_handle, topk_idx=c.topk), "v1"),
    Row("Buffer.combine", "rows other than the dispatch returned", ValueError, "rows",
        lambda c: c.v1.combine(torch.zeros(c.v1_handle.rows + 1, H, dtype=bf), c.v1_handle), "v1"),
    Row("Buffer.combine", "not a handle of Buffer.dispatch", TypeError, "handle must be",
        lambda c: c.v1.combine(c.y, c.handle), "v1"),
    # DeepEP V1's Buffer, low-latency mode
    Row("Buffer.low_latency_dispatch", "x not bf16", TypeError, "bfloat16", lambda c: _ll(c, x=c.llx.float()), "ll"),
    Row("Buffer.low_latency_dispatch", "more tokens than num_max_dispatch_tokens_per_rank", ValueError, "more than",
        lambda c: _ll(c, x=torch.zeros(LL_T + 1, LL_H, dtype=bf),
                      topk_idx=torch.zeros(LL_T + 1, 2, dtype=torch.int64)), "ll"),
    Row("Buffer.low_latency_dispatch", "use_ue8m0 without round_scale", ValueError, "round_scale",
        lambda c: _ll(c, use_ue8m0=True), "ll"),
    Row("Buffer.low_latency_dispatch", "async_finish and return_recv_hook together", ValueError, "cannot both",
        lambda c: _ll(c, async_finish=True, return_recv_hook=True), "ll"),
    Row("Buffer.low_latency_dispatch", "num_experts not a multiple of the ranks", ValueError, "multiple",
        lambda c: _ll(c, num_experts=c.llE + 1), "ll"),
    Row("Buffer.low_latency_dispatch", "num_max_recv_tokens_per_expert not a positive multiple of 4", ValueError,
        "num_max_recv_tokens_per_expert", lambda c: _ll(c, num_max_recv_tokens_per_expert=6), "ll"),
    Row("Buffer.low_latency_combine", "use_logfmt", NotImplementedError, "use_logfmt",
        lambda c: c.v1.low_latency_combine(c.llrecv, c.lltopk, c.llw, c.llhandle, use_logfmt=True), "ll"),
    Row("Buffer.low_latency_combine", "a handle not of low_latency_dispatch", ValueError, "handle",
        lambda c: c.v1.low_latency_combine(c.llrecv, c.lltopk, c.llw, (1, 2, 3, 4, 5)), "ll"),
    Row("Buffer.low_latency_update_mask_buffer", "a buffer without enable_shrink", ValueError, "enable_shrink",
        lambda c: c.v1.low_latency_update_mask_buffer(0, True), "ll"),
]


def markdown() -> str:
    """docs/errors.md."""
    lines = ["# Errors: what each call rejects", "",
             "Every row raises before any byte of any buffer changes, on every rank that passes the same input,",
             "and the buffer works for the next valid call (tests/cpu/test_errors.py runs each row on 2 CPU ranks",
             "and checks both). Generated by `python -m tritonep.testing.bad_inputs`.", "",
             "The symmetric backend checks expert ids on the device: for those rows the layout kernel has sent",
             "the counts to the peers (signal words, no token row) when every rank raises.", "",
             "| call | rejected input | exception | message contains | moved before the error |",
             "| --- | --- | --- | --- | --- |"]
    for r in ROWS:
        moved = "counts (no row)" if r.counts else "nothing"
        lines.append(f"| `{r.api}` | {r.condition} | `{r.exc.__name__}` | `{r.match}` | {moved} |")
    lines += ["", "## Errors of valid calls", "",
              "* `tritonep.CommTimeoutError` (a `TimeoutError`): a wait on a peer ran out of time; it names the",
              "  waiting rank, the peer and the operation. Without a host sync it is raised at the buffer's next",
              "  call (its kernels copy it to host memory). The buffer is unusable afterwards: destroy it.",
              "* `tritonep.RecvOverflowError` (a `RuntimeError`): a dispatch without a host sync would have",
              "  received more rows than `num_max_recv_tokens` (V1: `num_worst_tokens`; V1's low-latency",
              "  dispatch: `num_max_recv_tokens_per_expert`, rows per expert) gives it. Every rank",
              "  raises it, naming the rank that overflowed and the rows it needed; no row past the outputs was",
              "  written. With the symmetric heap it is raised at the buffer's next call (or the device flag",
              "  `get_error_flag()` is set, for CUDA graphs; V1: `get_error_flag(low_latency=True)` for the",
              "  low-latency calls), the buffer's kernels do nothing until every rank",
              "  calls `clear_overflow()`; the `alltoall` and `direct` backends and hybrid mode raise it in",
              "  the dispatch itself, and the buffer stays usable.", ""]
    return "\n".join(lines)


def _digest(c, counts: bool = False) -> str:
    """A hash of every byte of every heap and flag area the buffers own (CPU ranks: host memory);
    with ``counts``, not the dispatch buffer's signal words (where the layout kernel's counts go)."""
    h = hashlib.blake2b(digest_size=16)
    for t in c.areas(skip=c.ep._backend.heap.signals if counts else None):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Context:
    """Every buffer and a valid input of each API, on one CPU rank of a 2-rank group."""

    def __init__(self, group):
        import torch.distributed as dist

        from tritonep import Buffer, ElasticBuffer

        self.rank, self.R = dist.get_rank(group), dist.get_world_size(group)
        self.next = (self.rank + 1) % self.R
        gpu, cpu = ElasticBuffer.get_engram_storage_size_hint(64, H, 64)
        self.ep = ElasticBuffer(group, num_bytes=gpu + (2 << 20) + cpu, num_cpu_bytes=cpu,
                                num_max_tokens_per_rank=T, hidden=H, num_topk=K, num_gpu_timeout_secs=60,
                                explicitly_destroy=True)
        self.other = ElasticBuffer(group, num_max_tokens_per_rank=T, hidden=H, num_topk=K, explicitly_destroy=True)
        g = torch.Generator().manual_seed(self.rank)
        self.x = torch.randn(T, H, generator=g).to(bf)
        self.topk = torch.rand(T, E, generator=g).topk(K, dim=1).indices
        self.w = torch.rand(T, K, generator=g)
        _, _, _, self.handle, _ = _d(self)
        self.y = torch.zeros(self.handle.num_recv_tokens, H, dtype=bf)
        _, _, _, self.other_handle, _ = self.other.dispatch(self.x, topk_idx=self.topk, num_experts=E)
        self.ep.pp_set_config(4096, 2)
        self.ep.agrs_set_config(4096, 4)
        self.table = torch.randn(64, H, generator=g).to(bf)
        self.ep.engram_write(self.table)
        self.llE = 2 * self.R
        self.v1 = Buffer(group, 4 << 20, Buffer.get_low_latency_rdma_size_hint(LL_T, LL_H, self.R, self.llE),
                         low_latency_mode=True, explicitly_destroy=True)
        self.layout = self.v1.get_dispatch_layout(self.topk, E)
        self.v1_handle = _v1d(self)[4]
        self.llx = torch.randn(LL_T, LL_H, generator=g).to(bf)
        self.lltopk = torch.rand(LL_T, self.llE, generator=g).topk(2, dim=1).indices
        self.llw = torch.rand(LL_T, 2, generator=g)
        recv, _, self.llhandle, _, _ = _ll(self, use_fp8=False)
        self.llrecv = recv
        self.v1.low_latency_combine(recv, self.lltopk, self.llw, self.llhandle)

    def areas(self, skip=None) -> list:
        ep, v1 = self.ep, self.v1
        heaps = [ep._backend.heap, self.other._backend.heap, ep._pipe.words, ep._agrs.words,
                 v1._elastic._backend.heap, v1._ll.heap]
        return [t for hp in heaps for t in (hp.data, hp.signals) if t is not skip] + [ep._engram.shm.data]

    def valid_call(self, family: str) -> None:
        """The family's next valid call, checked (every rank runs it)."""
        c = self
        if family in ("ep", "v1"):  # rows back to their origin, summed without weights: x times its ranks
            if family == "ep":
                recv, _, _, handle, _ = _d(c)
                out = c.ep.combine(recv, handle)[0]
            else:
                layout = c.v1.get_dispatch_layout(c.topk, E)
                recv, _, _, _, handle, _ = c.v1.dispatch(
                    c.x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                    num_tokens_per_expert=layout[2], topk_idx=c.topk, topk_weights=c.w)
                out = c.v1.combine(recv, handle)[0]
            ranks = torch.stack([((c.topk // (E // c.R)) == d).any(1) for d in range(c.R)], 1).sum(1)
            want = (c.x.float() * ranks[:, None]).to(bf)
            assert torch.equal(out, want), f"{family}: rank {c.rank} wrong after a rejection"
        elif family == "pp":
            c.ep.pp_send(torch.full((8,), float(c.rank)), c.next)
            got = torch.zeros(8)
            c.ep.pp_recv(got, (c.rank - 1) % c.R)
            assert bool((got == (c.rank - 1) % c.R).all())
        elif family == "agrs":
            with c.ep.agrs_new_session():
                out, wait = c.ep.all_gather(torch.full((4,), float(c.rank)))
                wait()
                assert torch.equal(out[:, 0], torch.arange(c.R, dtype=torch.float32))
        elif family == "engram":
            data, _ = c.ep.engram_fetch(torch.tensor([[c.rank * 64 + 5]], dtype=torch.int32))()
            assert torch.equal(data.view(-1), c.table[5])
        elif family == "ll":
            recv, _, handle, _, _ = _ll(c, use_fp8=False)
            out = c.v1.low_latency_combine(recv, c.lltopk, c.llw, handle)[0]
            acc = torch.zeros(LL_T, LL_H)
            for s in range(2):
                acc = acc + c.llw[:, s:s + 1] * c.llx.float()
            assert torch.equal(out, acc.to(bf)), f"ll: rank {c.rank} wrong after a rejection"

    def destroy(self) -> None:
        for b in (self.ep, self.other, self.v1):
            b.destroy()


def run_table(group) -> int:
    """Every row on this rank (all ranks run the same rows): the error, no byte changed, then the
    family's valid call. Returns the number of rows."""
    import pytest

    import torch.distributed as dist

    c = Context(group)
    for row in ROWS:
        if row.session:
            c.ep.create_agrs_session()
        dist.barrier(group=group)  # no peer is still writing into this rank's buffers
        before = _digest(c, row.counts)
        with pytest.raises(row.exc) as info:
            row.call(c)
        assert row.match in str(info.value), f"{row.api} ({row.condition}): {str(info.value)!r} lacks {row.match!r}"
        assert _digest(c, row.counts) == before, f"{row.api} ({row.condition}) changed a buffer before raising"
        dist.barrier(group=group)  # every rank has checked before any peer writes again
        if row.session:
            c.ep.destroy_agrs_session()
        c.valid_call(row.family)
    c.destroy()
    return len(ROWS)


if __name__ == "__main__":
    print(markdown(), end="")
