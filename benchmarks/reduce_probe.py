"""One GPU, no peer: the dense combine's reduction (``combine_dense.reduce_dense``) checked bit for
bit and timed per tile shape, with the peer's rows already in this rank's buffer and its flags up.

Why: in the copy-engine combine the reduction of the last chunk's tokens trails the last copy, and
if the reduction is slower than the copies it bounds the whole combine. This gives its rate on
``--num-sms`` programs for each tile (tokens x channels x warps) without a second GPU.

With ``--send`` it also times the launch of a combine whose host does not know the counts (the
no-sync combine at 2 ranks, every combine of more ranks): half of the programs send this rank's
received rows to their origin (here: into this GPU's memory) and raise its flags, the others
reduce; alone (no tokens to reduce) and together.

Run: python benchmarks/reduce_probe.py [--tokens 8192] [--tiles 16x1024x8 32x512x8 64x256x16]
[--send [--send-tiles 32x512 64x256]]   (CPU: an interpreter smoke test)
"""
from __future__ import annotations

import torch

from bench_ep import shape_args
from probe_common import FakePeers, time_us
from tritonep.config import defaults_for
from tritonep.kernels import combine_dense
from tritonep.layout import compute_layout


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0], tokens=8192)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tiles", nargs="*", default=[], help="TOKENSxCHANNELSxWARPS (tokens <= 64), besides the default")
    p.add_argument("--send", action="store_true", help="also time half of the programs sending (see above)")
    p.add_argument("--send-tiles", nargs="*", default=[], help="ROWSxWORDS of a sender's step, besides the default")
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
    w_off, total = combine_dense.dense_area(R, T, H, k)
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

    cfg = defaults_for(R)

    def run(tile):
        combine_dense.reduce_dense(out=out, out_weights=None, bias=[], x=x, topk_weights=None, psum=psum,
                                   topk_idx=topk, dst_buffer_slot_idx=dst, combine_slot_idx=cslot, num_experts=E,
                                   heap=heap, data_ptrs=data_ptrs, T=T, flag_blocks=peers.flags,
                                   num_programs=args.num_sms, tile=tile, send_tile=cfg.combine_dense_send_tile,
                                   sender_share=cfg.sender_share, **peers.words)

    moved = T * H * 2 * 3  # ~two partials read and one row written per token
    tiles = [cfg.combine_dense_reduce_tile] + [tuple(int(v) for v in spec.split("x")) for spec in args.tiles]
    for tile in tiles:
        spec = "x".join(map(str, tile))
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
    if args.send:
        send_probe(args, x, want, heap, topk, dst, cslot, peers, data_ptrs)


def send_probe(args, x, want, heap, topk, dst, cslot, peers, data_ptrs) -> None:
    """Half of the programs send rank 0's rows received from rank 1 back to it (``data_ptrs[1]`` is
    this heap too: the rows land in rank 0's region of it, which the reduction never reads) and
    raise rank 1's flags; the other half reduce as above. Checked: the rows sent, every flag raised,
    the reduction's output."""
    T, H, E, k = args.tokens, args.hidden, args.experts, args.topk
    dev, cuda = x.device, x.is_cuda
    n_own = x.shape[0]
    sent = torch.randn(n_own, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(dev)
    rows = torch.cat([x, sent])  # rows received from rank 0 (itself), then from rank 1
    psum = torch.tensor([n_own, 2 * n_own], dtype=torch.int32, device=dev)
    landed = heap[:T * H * 2].view(torch.bfloat16).view(T, H)[:n_own]
    theirs = peers.sig[1][16:16 + peers.flags]  # rank 1's flags for rank 0's blocks
    out = torch.empty(T, H, dtype=torch.bfloat16, device=dev)
    none = torch.empty(0, k, dtype=topk.dtype, device=dev), torch.empty(0, k, dtype=dst.dtype, device=dev)

    cfg = defaults_for(2)

    def run(reduce: bool, tile):
        ids = (topk, dst, cslot) if reduce else (none[0], none[1], none[1])
        combine_dense.reduce_dense(out=out if reduce else out[:0], out_weights=None, bias=[], x=rows,
                                   topk_weights=None, psum=psum, topk_idx=ids[0], dst_buffer_slot_idx=ids[1],
                                   combine_slot_idx=ids[2], num_experts=E, heap=heap, data_ptrs=data_ptrs, T=T,
                                   flag_blocks=peers.flags, num_programs=args.num_sms, send=True, send_tile=tile,
                                   tile=cfg.combine_dense_reduce_tile, sender_share=cfg.sender_share, **peers.words)

    def arm():
        peers.arm()
        theirs.zero_()

    moved = n_own * H * 2  # bytes of rows sent
    tiles = [cfg.combine_dense_send_tile] + [tuple(int(v) for v in spec.split("x")) for spec in args.send_tiles]
    for reduce in (False, True):
        for tile in tiles:
            spec = "x".join(map(str, tile))
            out.fill_(float("nan"))
            landed.fill_(float("nan"))
            arm()
            run(reduce, tile)
            checks = {"rows sent": torch.equal(landed.view(torch.int16), sent.view(torch.int16)),
                      "flags raised": bool((theirs[:-(-n_own // combine_dense.FLAG_ROWS)] == -1).all()),
                      **peers.checks()}
            if reduce:
                checks["reduced"] = torch.equal(out.view(torch.int16), want.to(dev).view(torch.int16))
            line = (f"{'send + reduce' if reduce else 'send alone   '} {n_own} rows, {args.num_sms} programs, "
                    f"send tile {spec}: " + ", ".join(f"{name} {'ok' if v else 'WRONG'}" for name, v in checks.items()))
            if cuda:
                us = time_us(lambda: run(reduce, tile), arm, args.iters)
                line += f"; {us:.1f} us ({moved / us / 1e3:.0f} GB/s sent)"
            print(line)
            if not all(checks.values()):
                raise SystemExit(1)


if __name__ == "__main__":
    main()
