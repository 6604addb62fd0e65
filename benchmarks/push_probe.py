"""One GPU, no peer: the dispatch's row push (``dispatch_rows.push``, cached: the handle's slots)
timed and checked bit for bit, unfused against fused (each tile loaded once for every destination),
with and without counting rows for the overlapped copy-out, with the peer's receive area in this
GPU's own memory.

Why: the push is most of a cached dispatch (~204 of ~265 us at 8192 tokens on 2 x H200) and, by the
model in docs/design.md ("Fused push"), waits for its loads rather than for NVLink; with the peer's
stores going to local memory this measures exactly that part. It says nothing about NVLink: time
the variants end to end with ``bench_ep.py --variants push16 pt32_nopf pt32_unfused ov_out`` on two GPUs.
The default push (fused, 32x256x8, loading ahead since 2026-11-29) was chosen with this probe.

With ``--ranks R`` rank 0 of R pushes (every peer's receive area local too): how the push scales
with the destinations a token has (top-8 of 256 experts: ~2 of 2 ranks, ~5.3 of 8).

Run: python benchmarks/push_probe.py [--tokens 8192] [--ranks 2] [--num-sms 24 23] [--iters 50]
[--tiles 32x256x8 ...]   (CPU: a smoke test)
"""
from __future__ import annotations

import torch

from tritonep import sizing
from tritonep.kernels import dispatch_rows
from tritonep.layout import compute_layout

from bench_ep import shape_args
from gather_probe import time_us


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0], tokens=8192)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the group (rank 0 pushes; every peer's area local)")
    p.add_argument("--num-sms", type=int, nargs="+", default=[24, 23])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prefetch", action="store_true",
                   help="also time every variant with the next columns loaded ahead, at every tile")
    p.add_argument("--tiles", nargs="*", default=[],
                   help="tiles, tokens x words x warps (e.g. 32x512x16), timed besides the default "
                        "(dispatch_rows.PUSH_TILE) and 16x512x8 (the default until 2026-11-29)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    R, rank, T, H, E, k = args.ranks, 0, args.tokens, args.hidden, args.experts, args.topk
    num_sf, L = H // 128, E // R
    g = torch.Generator().manual_seed(0)
    topk = torch.rand(T, E, generator=g).topk(k, dim=1).indices  # uniform, distinct experts
    lay = compute_layout(topk, E, R, rank, T)
    counts = lay.send_counts[:, 0].tolist()  # rows this rank sends to each rank (itself included)
    x = torch.randint(-2**31, 2**31 - 1, (T, H // 4), dtype=torch.int32, generator=g).to(dev)  # FP8 rows
    sf = torch.randn(T, num_sf, generator=g).to(dev)
    w = torch.rand(T, k, generator=g).to(dev)
    topk, dslot, cslot = topk.to(dev), lay.dst_buffer_slot_idx.to(dev), lay.combine_slot_idx.to(dev)
    slot_layout = sizing.dispatch_rows_layout(R, T, H, num_sf, k)
    size = sizing.dispatch_bytes(R, T, H, num_sf, k)
    heaps = [torch.zeros(size // 4 + 16, dtype=torch.int32, device=dev) for _ in range(R)]
    data_ptrs = torch.tensor([h.data_ptr() for h in heaps], dtype=torch.int64, device=dev)
    blocks = -(-T // 8)
    words = sizing.num_signal_words(R, 2 * blocks)  # (the combine's flags, then the slot counters)
    sig = [torch.zeros(words, dtype=torch.int32, device=dev) for _ in range(R)]
    signal_ptrs = torch.tensor([s.data_ptr() for s in sig], dtype=torch.int64, device=dev)
    ready, freed, _, _, flags = sizing.signal_offsets(R)
    M = counts[rank]  # this rank's own rows are the outputs' first rows (rank 0: psum[-1] is not read)
    psum = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)  # (only psum[rank - 1] is read)
    outs = dict(recv_x_words=torch.empty(M, H // 4, dtype=torch.int32, device=dev),
                recv_sf=torch.empty(M, num_sf, device=dev),
                recv_topk_idx=torch.empty(M, k, dtype=torch.int64, device=dev),
                recv_topk_weights=torch.empty(M, k, device=dev),
                recv_src_metadata=torch.empty(M, k + 2, dtype=torch.int32, device=dev))
    state = dict(counter=torch.zeros(4, dtype=torch.int32, device=dev), status=torch.zeros(4, dtype=torch.int32,
                 device=dev), seq_ptr=torch.zeros(1, dtype=torch.int32, device=dev))

    def run(fused: bool, count: bool, programs: int, tile=None, prefetch=False):
        dispatch_rows.push(
            x_words=x, sf=sf, topk_idx=topk, topk_weights=w, dst_buffer_slot_idx=dslot, combine_slot_idx=cslot,
            block_base=None, psum=psum, heap_words=heaps[rank], data_ptrs=data_ptrs, signal_ptrs=signal_ptrs,
            rank=rank, num_ranks=R, num_experts=E, T=T, slot_layout=slot_layout, ready_word=ready,
            freed_word=freed, timeout_ns=10**10, num_programs=programs, wait_freed=True,
            slot_counts_word=flags + R * blocks, slot_blocks=blocks, count_arrivals=count, fused=fused,
            tile=tile, prefetch=prefetch, **outs, **state)

    def arm():  # the peers freed their buffers for operation 1 (it stays operation 1: the push ends nothing)
        for s in sig:
            s.zero_()

    # the rows this rank wrote into each peer's receive region
    regions = [heaps[d][rank * T * slot_layout[0] // 4:][:counts[d] * slot_layout[0] // 4] for d in range(R) if d != rank]

    def result():
        return [o.clone() for o in outs.values()] + [r.clone() for r in regions]

    tiles = [dispatch_rows.PIPELINED_PUSH_TILE, dispatch_rows.PUSH_TILE]
    tiles += [t for t in (tuple(int(v) for v in t.split("x")) for t in args.tiles) if t not in tiles]
    variants = [(False, False), (True, False), (False, True), (True, True)]
    checks = [(f, c, t, ahead) for ahead in ((False, True) if args.prefetch else (False,)) for t in tiles
              for f, c in variants]
    want = None
    for fused, count, tile, ahead in checks:
        for o in list(outs.values()) + heaps:
            o.view(torch.int32).fill_(-7)
        arm()
        run(fused, count, args.num_sms[0], tile, ahead)
        got = result()
        if want is None:
            want = got
            # the unfused push against the source: own rows in token order, then the peer's slots
            own = (dslot.view(T, k) >= 0) & ((topk // L) == rank)
            keep = own.any(1).nonzero().flatten()
            assert torch.equal(outs["recv_x_words"], x[keep]), "unfused push: own rows wrong"
        same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want))
        for d in range(R) if count else ():  # each peer's per-16-slot counters of this rank's rows: all full
            if d != rank:
                ctrs = sig[d][flags + R * blocks + rank * blocks:][:blocks].cpu()
                full = (counts[d] - torch.arange(blocks) * dispatch_rows.BLOCK_TOKENS).clamp(0, dispatch_rows.BLOCK_TOKENS)
                same = same and torch.equal(ctrs, full.to(ctrs.dtype))
        print(f"fused={fused} count={count} tile={tile} prefetch={ahead}: outputs and the peers' rows "
              f"{'identical' if same else 'DIFFER'}")
        if not same:
            raise SystemExit(1)
    if not cuda:
        return
    stored = sum(counts)
    moved = stored * (H + num_sf * 4)
    for programs in args.num_sms:
        for fused, count, tile, ahead in checks:
            us = time_us(lambda: run(fused, count, programs, tile, ahead), arm, args.iters)
            name = "x".join(map(str, tile))
            print(f"{programs} programs, {name:>10}, fused={fused!s:5} count={count!s:5}"
                  f"{' prefetch' if ahead else ''}: {us:7.1f} us "
                  f"({moved / us / 1e3:.0f} GB/s of rows stored, {stored} rows)")


if __name__ == "__main__":
    main()
