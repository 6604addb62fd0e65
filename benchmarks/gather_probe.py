"""One GPU, no peer: the copy-engine cached dispatch's receive kernel (``dispatch_rows.gather``) checked
bit for bit and timed, with a peer's region filled in place and its flags already up.

Why: the gather runs beside the copy engine's sends and its last tile trails the last copy; this
gives its local rate (the tail's cost) and checks the GPU build of the kernel (int64 offsets from
the heap's base, 16-byte rows, scales, ids, weights) and of ``primitives.set_words`` (which raises
the flags here), without a second GPU.

Run: python benchmarks/gather_probe.py [--tokens 8192] [--iters 50]   (CPU: an interpreter smoke test)
"""
from __future__ import annotations

import argparse
import statistics

import torch

from tritonep import sizing
from tritonep.kernels import dispatch_rows, primitives


class FakePeers:
    """Signal areas of a 2-rank group on one device, for calling a receive kernel as ``rank``
    without a peer: :meth:`arm` makes every peer ``ready`` for operation 1 and raises every flag
    (``flags`` words per sender from word 16) to -1, as if every copy had landed."""

    def __init__(self, dev, rank: int, flags: int, R: int = 2):
        self.rank, self.flags, self.R = rank, flags, R
        self.sig = [torch.zeros(16 + R * flags, dtype=torch.int32, device=dev) for _ in range(R)]
        self.signal_ptrs = torch.tensor([s.data_ptr() for s in self.sig], dtype=torch.int64, device=dev)
        self.counter = torch.zeros(4, dtype=torch.int32, device=dev)
        self.status = torch.zeros(4, dtype=torch.int32, device=dev)
        self.seq = torch.zeros(1, dtype=torch.int32, device=dev)
        self.words = dict(signal_ptrs=self.signal_ptrs, counter=self.counter, status=self.status, rank=rank,
                          num_ranks=R, seq_ptr=self.seq, flags_word=16, ready_word=0, freed_word=2,
                          timeout_ns=10**10)

    def arm(self):
        self.seq.zero_()
        self.sig[self.rank][0:2] = 1
        primitives.set_words(self.sig[self.rank].data_ptr() + 4 * 16, self.R * self.flags, -1)

    def checks(self) -> dict:
        return {"flags zeroed": int(self.sig[self.rank][16:].abs().sum()) == 0,
                "freed raised": self.sig[0][2 + self.rank].item() == 1,
                "status": int(self.status.abs().sum()) == 0}


def time_us(fn, arm, iters: int) -> float:
    """Median of ``iters`` timed calls of ``fn`` (CUDA events), each after ``arm``, after 5 more."""
    times = []
    for i in range(iters + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        arm()
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tiles", nargs="*", default=[], help="also time these tiles: ROWSxWORDSxWARPS, e.g. 32x256x8")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    R, rank, T, H, k = 2, 1, args.tokens, args.hidden, args.topk
    num_sf, L = H // 128, 128
    g = torch.Generator().manual_seed(0)
    off_sf, off_topk, off_w, total = sizing.broadcast_layout(R, T, H, num_sf, k)
    heap = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=g).to(dev)
    # this rank's own tokens (FP8 rows as bytes, scales, ids, weights) and source 0's, in the heap
    x = torch.randint(0, 256, (T, H), dtype=torch.uint8, generator=g).to(dev)
    sf = torch.randn(T, num_sf, generator=g).to(dev)
    topk = torch.randint(0, R * L, (T, k), generator=g).to(dev)
    w = torch.rand(T, k, generator=g).to(dev)
    peer_x = heap[:T * H].view(T, H)
    peer_sf = heap[off_sf:off_sf + T * num_sf * 4].view(torch.float32).view(T, num_sf)
    peer_topk = heap[off_topk:off_topk + T * k * 8].view(torch.int64).view(T, k)
    peer_w = heap[off_w:off_w + T * k * 4].view(torch.float32).view(T, k)
    peer_topk.copy_(torch.randint(-1, R * L, (T, k), generator=g).to(dev))
    peer_sf.copy_(torch.randn(T, num_sf, generator=g).to(dev))  # (random bytes could be NaNs)
    peer_w.copy_(torch.rand(T, k, generator=g).to(dev))
    # rows received: source 0's tokens routed here (~all at top-8 of 2 x 128), then this rank's own
    here = lambda ids: ((ids >= rank * L) & (ids < (rank + 1) * L)).any(1)  # noqa: E731
    t0 = here(peer_topk).nonzero().flatten()
    t1 = here(topk).nonzero().flatten()
    src = torch.cat([t0, rank * T + t1]).to(torch.int32)
    M = src.numel()
    meta = torch.zeros(M, k + 2, dtype=torch.int32, device=dev)
    meta[:, 0] = src
    psum = torch.tensor([t0.numel(), M], dtype=torch.int32, device=dev)
    flag_blocks = -(-T // 64)
    peers = FakePeers(dev, rank, flag_blocks)
    outs = dict(recv_x=torch.empty(M, H, dtype=torch.uint8, device=dev),
                recv_sf=torch.empty(M, num_sf, device=dev),
                recv_topk_idx=torch.empty(M, k, dtype=torch.int64, device=dev),
                recv_topk_weights=torch.empty(M, k, device=dev))

    def run(tile=(dispatch_rows.EPILOGUE_TOKENS, dispatch_rows.EPILOGUE_WORDS, dispatch_rows.EPILOGUE_WARPS)):
        dispatch_rows.gather(heap=heap, x=x, sf=sf, topk_idx=topk, topk_weights=w, recv_src_metadata=meta,
                             psum=psum, num_local_experts=L, T=T, broadcast_layout=(off_sf, off_topk, off_w, total),
                             flag_blocks=flag_blocks, num_programs=args.num_sms, tile=tile, **peers.words, **outs)

    for o in outs.values():
        o.fill_(0xFF) if o.dtype == torch.uint8 else o.fill_(-7)
    peers.arm()
    run()
    want_x = torch.cat([peer_x[t0], x[t1]])
    want_sf = torch.cat([peer_sf[t0], sf[t1]])
    ids = torch.cat([peer_topk[t0], topk[t1]])
    local = ids - rank * L
    want_topk = torch.where((ids >= 0) & (local >= 0) & (local < L), local, -1)
    want_w = torch.cat([peer_w[t0], w[t1]])
    same = lambda a, b: torch.equal(a.view(torch.int32), b.view(torch.int32))  # noqa: E731  bit for bit
    checks = {"rows": torch.equal(outs["recv_x"], want_x), "scales": same(outs["recv_sf"], want_sf),
              "ids": torch.equal(outs["recv_topk_idx"], want_topk),
              "weights": same(outs["recv_topk_weights"], want_w), **peers.checks()}
    print(f"gather of {M} rows ({t0.numel()} from the peer's region), hidden {H} FP8, {args.num_sms} programs: "
          + ", ".join(f"{k} {'ok' if v else 'WRONG'}" for k, v in checks.items()))
    if not all(checks.values()):
        raise SystemExit(1)
    if not cuda:
        return
    us = time_us(run, peers.arm, args.iters)
    moved = 2 * M * (H + num_sf * 4 + k * 12)
    print(f"gather: {us:.1f} us median of {args.iters} ({moved / us / 1e3:.0f} GB/s read + written, "
          f"{M * H / 1e6:.1f} MB of rows)")
    for spec in args.tiles:
        tile = tuple(int(v) for v in spec.split("x"))
        us = time_us(lambda: run(tile), peers.arm, args.iters)
        ok = torch.equal(outs["recv_x"], want_x)
        print(f"tile {spec}: {us:.1f} us ({moved / us / 1e3:.0f} GB/s){'' if ok else ' WRONG'}")


if __name__ == "__main__":
    main()
