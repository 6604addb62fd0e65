"""PyTorch's NVSHMEM 2-D all-to-all (``torch.ops.symm_mem.all_to_all_vdev_2d``) as a dispatch/combine
peer, on bench_ep.py's routing (``make_topk`` seed 7) and shapes. Its own correctness check (below)
must pass before its times count. Status: on the H200 machines measured (torch 2.11.0+cu130, 2026-11-28)
it does not run: ``set_backend("NVSHMEM")`` raises "SymmetricMemory does not find allocation backend
NVSHMEM"; the script then says why and exits cleanly.

Run in its own processes (NVSHMEM has to be torch's symmetric-memory backend before anything is
allocated, and tritonep's heap uses the default backend):

    TORCH_SYMMMEM=NVSHMEM torchrun --nproc_per_node=2 benchmarks/vdev_peer.py [--tokens 1024 4096 8192] \\
        [--dispatch-dtype fp8] [--out rows.json]

What the op moves: one row per (token, expert) pair, from rank-major order (the input sorted by
global expert) to expert-major order (per local expert, the rows of every source rank: what a
grouped GEMM reads), with the counts exchanged on the device (no host sync). tritonep's dispatch
moves one row per (token, destination rank), so at top-8 of 256 experts on 2 ranks this peer
carries about 4x the rows; both byte counts are printed (``nvlink_bytes_dispatch`` as bench_ep.py
counts them, ``vdev_bytes_dispatch`` what the op sends to other ranks).

Timed, per op (CUDA events, median after warm-up, barrier before each, and back to back):
* dispatch: sort the (token, slot) pairs by expert, counts per expert, rows gathered into the
  symmetric input (all ``n * k`` positions, empty slots last and not sent), the op. FP8 rows travel
  packed with their scales (``hidden + 4 * hidden / 128`` bytes per row).
* combine (BF16): ``all_to_all_vdev_2d_offset`` from the expert-major rows back to rank-major (the
  expert outputs are taken to be in a symmetric buffer already, as a grouped GEMM can write them),
  then each token's rows summed in fp32 (``index_add_``) and rounded to bf16.

Check (printed, ``check ok``/``FAILED``): a BF16 dispatch, then a combine of the received rows
themselves, must give each token ``(number of its experts) * x`` (fp32 sum, one rounding).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_SYMMMEM", "NVSHMEM")
os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", "10G")  # the worst-case buffers below take ~4 GB at 8192 tokens

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._symmetric_memory as symm_mem  # noqa: E402

from bench_ep import _time, _time_back_to_back, init_ranks, shape_args, write_rows  # noqa: E402


class VdevPeer:
    """Dispatch/combine of one routing with PyTorch's NVSHMEM all-to-all ops; buffers sized for
    ``max_tokens`` tokens per rank (worst case: every pair of every rank comes to this one)."""

    def __init__(self, group, max_tokens: int, row_bytes: int, hidden: int, num_topk: int, num_experts: int,
                 device):
        self.group_name = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(self.group_name)
        R = dist.get_world_size(group)
        pairs = max_tokens * num_topk

        def sym(shape, dtype):
            t = symm_mem.empty(shape, dtype=dtype, device=device)
            symm_mem.rendezvous(t, group=self.group_name)
            return t

        self.E = num_experts
        self.k = num_topk
        self.pairs, self.R = pairs, R
        # flat, viewed per call as [rows, row width]: the op reads the row stride from the view
        self.disp_in = sym((pairs * row_bytes,), torch.uint8)
        self.disp_out = sym((R * pairs * row_bytes,), torch.uint8)
        self.last_out = None
        self.comb_in = sym((R * pairs, hidden), torch.bfloat16)
        self.comb_out = sym((pairs, hidden), torch.bfloat16)
        self.in_splits = sym((num_experts,), torch.int64)
        self.counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
        self.out_so = sym((2, num_experts), torch.int64)
        self.comb_in_so = sym((2, num_experts), torch.int64)
        self.comb_out_so = sym((2, num_experts), torch.int64)

    def dispatch(self, rows: torch.Tensor, topk: torch.Tensor):
        """``rows``: ``[n, row_bytes]`` uint8; ``topk``: ``[n, k]`` int64 (negative: empty).
        Returns the sorted pair order (``[n * k]``, pair = token * k + slot) for :meth:`combine`."""
        flat = topk.reshape(-1)
        key = torch.where(flat >= 0, flat, self.E)  # empty slots sort last and are not counted
        order = torch.argsort(key, stable=True)
        # per-expert counts without a host sync (bincount sizes its output on the host)
        self.counts.zero_().index_add_(0, key, torch.ones_like(key))
        self.in_splits.copy_(self.counts[:self.E])
        w = rows.shape[1]
        inp = self.disp_in[:self.pairs * w].view(self.pairs, w)
        out = self.disp_out[:self.R * self.pairs * w].view(self.R * self.pairs, w)
        torch.index_select(rows, 0, order // self.k, out=inp[:order.numel()])
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, self.in_splits, self.out_so, self.group_name)
        self.last_out = out
        return order

    def combine(self, order: torch.Tensor, valid_sorted: torch.Tensor, n: int) -> torch.Tensor:
        """The rows in ``comb_in`` (expert-major, placed like the dispatch's output) back to their
        tokens, summed in fp32: ``[n, hidden]`` bf16."""
        self.comb_in_so.copy_(self.out_so)
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(self.comb_in, self.comb_out, self.comb_in_so, self.comb_out_so,
                                                     self.group_name)
        back = self.comb_out[:order.numel()].float()
        back = torch.where(valid_sorted[:, None], back, 0.0)
        out = torch.zeros(n, back.shape[1], dtype=torch.float32, device=back.device)
        out.index_add_(0, order // self.k, back)
        return out.to(torch.bfloat16)


def nvshmem_missing() -> str:
    """Why PyTorch's NVSHMEM all-to-all cannot run in this process ('' when it can): the op, the
    library and torch's NVSHMEM allocation backend must all be there."""
    if not hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d"):
        return f"torch {torch.__version__} has no torch.ops.symm_mem.all_to_all_vdev_2d"
    available = getattr(symm_mem, "is_nvshmem_available", lambda: None)()
    if available is False:
        return f"torch {torch.__version__}: symm_mem.is_nvshmem_available() is False"
    if hasattr(symm_mem, "set_backend"):
        try:
            symm_mem.set_backend("NVSHMEM")
        except RuntimeError as e:
            return (f"torch {torch.__version__}: symm_mem.set_backend('NVSHMEM') raised '{e}' "
                    f"(is_nvshmem_available() = {available}): this build registers no NVSHMEM allocator")
    return ""


def main() -> None:
    p = shape_args(__doc__.split("\n\n")[0])
    p.add_argument("--dispatch-dtype", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rank, device = init_ranks()
    reason = nvshmem_missing()
    if reason:
        # say so (issue 4: "where it runs, say so where not") and leave a row that records it
        if rank == 0:
            print(f"all_to_all_vdev_2d does not run here: {reason}")
            if args.out:
                write_rows([dict(op_peer="vdev_2d", num_ranks=dist.get_world_size(), available=False,
                                 reason=reason)], args.out)
        dist.destroy_process_group()
        return
    from tritonep.testing.gate import make_topk

    R, H, E, K = dist.get_world_size(), args.hidden, args.experts, args.topk
    L = E // R
    fp8 = args.dispatch_dtype == "fp8"
    row_bytes = H + 4 * (H // 128) if fp8 else 2 * H
    peer = VdevPeer(dist.group.WORLD, max(args.tokens), max(row_bytes, 2 * H), H, K, E, device)
    rows_out = []
    for n in args.tokens:
        topk = make_topk(7, rank, n, E, K, "uniform").to(device)
        x = torch.randn(n, H, device=device).to(torch.bfloat16)
        # the check: a bf16 dispatch, then the received rows combined back
        order = peer.dispatch(x.view(torch.uint8), topk)
        received = peer.last_out.view(torch.bfloat16)
        peer.comb_in[:received.shape[0]].copy_(received)
        valid_sorted = topk.reshape(-1)[order] >= 0
        got = peer.combine(order, valid_sorted, n)
        want = (x.float() * (topk >= 0).sum(1, keepdim=True).float()).to(torch.bfloat16)
        ok = torch.equal(got, want)
        # the timed rows: packed fp8 rows (data + scales) or bf16
        data = torch.randint(0, 255, (n, row_bytes), dtype=torch.uint8, device=device) if fp8 else x.view(torch.uint8)
        t_d = _time(lambda: peer.dispatch(data, topk), args.warmup, args.iters, True)
        t_c = _time(lambda: peer.combine(order, valid_sorted, n), args.warmup, args.iters, True)
        b_d = _time_back_to_back(lambda: peer.dispatch(data, topk), args.iters, True)
        b_c = _time_back_to_back(lambda: peer.combine(order, valid_sorted, n), args.iters, True)
        dest = topk // L
        per_rank = sum(int(((dest == d).any(dim=1)).sum()) for d in range(R) if d != rank)
        pairs_out = int(((dest != rank) & (topk >= 0)).sum())
        rows_out.append(dict(tokens=n, op_peer="vdev_2d", dispatch_dtype=args.dispatch_dtype, num_ranks=R,
                             dispatch_us=t_d, combine_bf16_us=t_c, dispatch_b2b_us=b_d, combine_b2b_us=b_c,
                             nvlink_bytes_dispatch=per_rank * row_bytes, vdev_bytes_dispatch=pairs_out * row_bytes,
                             vdev_bytes_combine=pairs_out * 2 * H, check=ok))
    if rank == 0:
        print(f"{R} ranks, hidden {H}, top-{K} of {E}; torch.ops.symm_mem.all_to_all_vdev_2d (NVSHMEM)")
        print(f"{'tokens':>6} {'dispatch us':>11} {'b2b':>6} {'combine us':>10} {'b2b':>6} {'vdev MB':>8} "
              f"{'bench_ep MB':>11} check")
        for r in rows_out:
            print(f"{r['tokens']:>6} {r['dispatch_us']:>11.0f} {r['dispatch_b2b_us']:>6.0f} "
                  f"{r['combine_bf16_us']:>10.0f} {r['combine_b2b_us']:>6.0f} {r['vdev_bytes_dispatch'] / 1e6:>8.1f} "
                  f"{r['nvlink_bytes_dispatch'] / 1e6:>11.1f} {'ok' if r['check'] else 'FAILED'}")
        if args.out:
            write_rows(rows_out, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
