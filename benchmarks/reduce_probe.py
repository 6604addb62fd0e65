"""One GPU, no peer: the copy-engine combine's reduction (``combine_rows.reduce_copied``) checked bit for
bit and timed per tile shape, with the peer's rows already in this rank's buffer and its flags up.

Why: in the copy-engine combine the reduction of the last chunk's tokens trails the last copy, and
if the reduction is slower than the copies it bounds the whole combine. This gives its rate on
``--num-sms`` programs for each tile (tokens x channels x warps) without a second GPU.

Run: python benchmarks/reduce_probe.py [--tokens 8192] [--tiles 16x1024x8 32x512x8 64x256x8]
(CPU: an interpreter smoke test)
"""
from __future__ import annotations

import torch

from bench_ep import shape_args
from gather_probe import FakePeers, time_us
from tritonep.kernels import combine_rows
from tritonep.layout import compute_layout


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0], tokens=8192)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tiles", nargs="*", default=["16x1024x8"], help="TOKENSxCHANNELSxWARPS (tokens <= 64)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    R, rank, T, H, E, k = 2, 0, args.tokens, args.hidden, args.experts, args.topk
    g = torch.Generator().manual_seed(1)
    # this rank's tokens, routed top-k (distinct experts) over both ranks; their layout at each rank
    topk = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    lay = compute_layout(topk, E, R, rank, T)
    dst, cslot = lay.dst_buffer_slot_idx, lay.combine_slot_idx
    dest = torch.where(topk >= 0, topk // (E // R), -1)
    own = (dest == rank).any(1)
    n_own = int(own.sum())
    # partials: this rank's own rows in x (slot order), the peer's in its region of the buffer
    x = torch.randn(n_own, H, generator=g).to(torch.bfloat16)
    w_off, total = combine_rows.copied_layout(R, T, H, k)
    heap = torch.zeros(total, dtype=torch.uint8)
    peer = heap[:2 * T * H * 2].view(torch.bfloat16).view(2, T, H)
    peer[1] = torch.randn(T, H, generator=g).to(torch.bfloat16)
    # reference: per token, the partials of its destinations (at most 2) summed in fp32, one rounding
    want = torch.zeros(T, H)
    for r in range(R):
        rep = (dest == r) & (dst >= 0)  # the slot that carries the token to r
        has = rep.any(1)
        slot = torch.where(rep, dst.to(torch.int64) - rank * T, 0).amax(1)
        rows = x[slot[has]] if r == rank else peer[r][slot[has]]
        want[has] += rows.float()
    want = want.to(torch.bfloat16)
    to = dict(device=dev)
    x, heap, topk, dst, cslot = x.to(**to), heap.to(**to), topk.to(**to), dst.to(**to), cslot.to(**to)
    psum = torch.tensor([n_own, n_own + T], dtype=torch.int32, device=dev)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    peers = FakePeers(dev, rank, -(-T // 64))
    data_ptrs = torch.tensor([heap.data_ptr()] * R, dtype=torch.int64, device=dev)

    def run(tile):
        combine_rows.reduce_copied(out=out, out_weights=None, bias=[], x=x, topk_weights=None, psum=psum,
                                   topk_idx=topk, dst_buffer_slot_idx=dst, combine_slot_idx=cslot, num_experts=E,
                                   heap=heap, data_ptrs=data_ptrs, T=T, flag_blocks=peers.flags,
                                   num_programs=args.num_sms, tile=tile, **peers.words)

    moved = T * H * 2 * 3  # ~two partials read and one row written per token
    for spec in args.tiles:
        tile = tuple(int(v) for v in spec.split("x"))
        out.fill_(float("nan"))
        peers.arm()
        run(tile)
        checks = {"rows": torch.equal(out.cpu().view(torch.int16), want.view(torch.int16)), **peers.checks()}
        line = f"reduce of {T} tokens, hidden {H}, {args.num_sms} programs, tile {spec}: " + ", ".join(
            f"{name} {'ok' if v else 'WRONG'}" for name, v in checks.items())
        if cuda:
            us = time_us(lambda: run(tile), peers.arm, args.iters)
            line += f"; {us:.1f} us ({moved / us / 1e3:.0f} GB/s)"
        print(line)
        if not all(checks.values()):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
