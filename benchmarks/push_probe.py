"""One GPU, no peer: the dispatch's row push (``kernels/dispatch.py``, cached: the handle's slots)
timed and checked bit for bit at several tiles, with the peers' receive areas in this GPU's own
memory.

Why: the push is most of a cached dispatch and, by the model in docs/design.md ("Fused push"), waits
for its loads rather than for NVLink; with the peers' stores going to local memory this measures
exactly that part. It says nothing about NVLink: time a ``KernelConfig`` end to end with ``bench_ep.py``
on two GPUs. The default push tile (``KernelConfig.dispatch_push_tile``) was chosen with this probe.

With ``--ranks R`` rank 0 of R pushes (every peer's receive area local too): how the push scales
with the destinations a token has (top-8 of 256 experts: ~2 of 2 ranks, ~5.3 of 8).

Run: python benchmarks/push_probe.py [--tokens 8192] [--ranks 2] [--num-sms 24 23] [--iters 50]
[--tiles 16x512x8 ...]   (CPU: a smoke test)
"""
from __future__ import annotations

import torch

from tritonep import sizing
from tritonep.config import defaults_for
from tritonep.kernels import dispatch
from tritonep.layout import compute_layout
from tritonep.status import STATUS_WORDS

from bench_ep import shape_args
from probe_common import time_us


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0], tokens=8192)
    p.add_argument("--ranks", type=int, default=2, help="ranks of the group (rank 0 pushes; every peer's area local)")
    p.add_argument("--num-sms", type=int, nargs="+", default=[24, 23])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tiles", nargs="*", default=[],
                   help="tiles, tokens x words x warps (e.g. 16x512x8), timed besides the default")
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
    area = sizing.dispatch_area(R, T, H, num_sf, k)
    size = sizing.dispatch_bytes(R, T, H, num_sf, k)
    heaps = [torch.zeros(size // 4 + 16, dtype=torch.int32, device=dev) for _ in range(R)]
    data_ptrs = torch.tensor([h.data_ptr() for h in heaps], dtype=torch.int64, device=dev)
    sig = [torch.zeros(sizing.num_signal_words(R), dtype=torch.int32, device=dev) for _ in range(R)]
    signal_ptrs = torch.tensor([s.data_ptr() for s in sig], dtype=torch.int64, device=dev)
    ready, freed, _, _, _ = sizing.signal_offsets(R)
    M = counts[rank]  # this rank's own rows are the outputs' first rows (rank 0: psum[-1] is not read)
    psum = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)  # (only psum[rank - 1] is read)
    outs = dict(recv_x_words=torch.empty(M, H // 4, dtype=torch.int32, device=dev),
                recv_sf=torch.empty(M, num_sf, device=dev),
                recv_topk_idx=torch.empty(M, k, dtype=torch.int64, device=dev),
                recv_topk_weights=torch.empty(M, k, device=dev),
                recv_src_metadata=torch.empty(M, k + 2, dtype=torch.int32, device=dev))
    state = dict(counter=torch.zeros(4, dtype=torch.int32, device=dev),
                 status=torch.zeros(STATUS_WORDS, dtype=torch.int32, device=dev),  # (see tritonep.status)
                 seq_ptr=torch.zeros(1, dtype=torch.int32, device=dev))

    def run(programs: int, tile):
        dispatch.push(
            x_words=x, sf=sf, topk_idx=topk, topk_weights=w, dst_buffer_slot_idx=dslot, combine_slot_idx=cslot,
            block_base=None, psum=psum, heap_words=heaps[rank], data_ptrs=data_ptrs, signal_ptrs=signal_ptrs,
            rank=rank, num_ranks=R, num_experts=E, T=T, area=area, ready_word=ready, freed_word=freed,
            timeout_ns=10**10, num_programs=programs, wait_freed=True, tile=tile, **outs, **state)

    def arm():  # the peers freed their buffers for operation 1 (it stays operation 1: the push ends nothing)
        for s in sig:
            s.zero_()

    # the rows this rank wrote into each peer's receive region
    regions = [heaps[d][rank * T * area[0] // 4:][:counts[d] * area[0] // 4] for d in range(R) if d != rank]

    def result():
        return [o.clone() for o in outs.values()] + [r.clone() for r in regions]

    tiles = [defaults_for(R).dispatch_push_tile]
    tiles += [t for t in (tuple(int(v) for v in t.split("x")) for t in args.tiles) if t not in tiles]
    want = None
    for tile in tiles:
        for o in list(outs.values()) + heaps:
            o.view(torch.int32).fill_(-7)
        arm()
        run(args.num_sms[0], tile)
        got = result()
        if want is None:
            want = got
            # against the source: own rows in token order
            own = (dslot.view(T, k) >= 0) & ((topk // L) == rank)
            keep = own.any(1).nonzero().flatten()
            assert torch.equal(outs["recv_x_words"], x[keep]), "push: own rows wrong"
        same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got, want))
        print(f"tile={tile}: outputs and the peers' rows {'identical' if same else 'DIFFER'}")
        if not same:
            raise SystemExit(1)
    if not cuda:
        return
    stored = sum(counts)
    moved = stored * (H + num_sf * 4)
    for programs in args.num_sms:
        for tile in tiles:
            us = time_us(lambda: run(programs, tile), arm, args.iters)
            name = "x".join(map(str, tile))
            print(f"{programs} programs, {R} ranks, {name:>10}: {us:7.1f} us "
                  f"({moved / us / 1e3:.0f} GB/s of rows stored, {stored} rows)")


if __name__ == "__main__":
    main()
