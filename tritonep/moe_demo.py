"""The main job: an expert-parallel MoE layer forward across ranks, checked against the dense layer.

Each rank routes its tokens (softmax gate, top-k), dispatches them, runs a small SiLU MLP per local
expert on what it received, scales by the gate weights, and combines. Rank 0 then gathers every
rank's tokens and outputs and recomputes the whole layer densely in one process.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _expert_weights(seed: int, e: int, hidden: int, ffn: int, device):
    g = torch.Generator().manual_seed(seed * 7919 + e)
    w1 = (torch.randn(hidden, ffn, generator=g) / hidden ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(ffn, hidden, generator=g) / ffn ** 0.5).to(torch.bfloat16)
    return w1.to(device), w2.to(device)


def _mlp(x, w1, w2):
    return F.silu(x.float() @ w1.float()) @ w2.float()


def _route(x, gate, k):
    probs = torch.softmax(x.float() @ gate.float(), dim=1)
    w, idx = probs.topk(k, dim=1)
    return idx, (w / w.sum(dim=1, keepdim=True)).float()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(info, args) -> dict:
    from tritonep import ElasticBuffer

    dev, r, R = info.device, info.rank, info.world_size
    E, H, k, n = args.experts, args.hidden, args.topk, args.tokens
    L = E // R
    g = torch.Generator().manual_seed(args.seed * 31 + r)
    x = torch.randn(n, H, generator=g).to(torch.bfloat16).to(dev)
    gate = (torch.randn(H, E, generator=torch.Generator().manual_seed(args.seed)) / H ** 0.5).to(dev)
    experts = [_expert_weights(args.seed, r * L + i, H, args.ffn, dev) for i in range(L)]
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=n, hidden=H, num_topk=k, backend=args.backend,
                        explicitly_destroy=True)

    def layer():
        topk_idx, topk_w = _route(x, gate, k)
        recv_x, recv_idx, recv_w, handle, _ = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, num_experts=E)
        _sync(dev)
        t1 = time.perf_counter()
        y = torch.zeros(recv_x.shape[0], H, dtype=torch.float32, device=dev)
        for i, (w1, w2) in enumerate(experts):
            rows, slots = (recv_idx == i).nonzero(as_tuple=True)
            if len(rows):
                y.index_add_(0, rows, _mlp(recv_x[rows], w1, w2) * recv_w[rows, slots][:, None])
        _sync(dev)
        t2 = time.perf_counter()
        out, _, _ = buf.combine(y.to(torch.bfloat16), handle)
        return topk_idx, topk_w, out, handle, t2 - t1

    layer()  # warm-up (kernel compilation on GPUs)
    buf.get_wait_stats()  # (from the timed steps on)
    times, expert_times = [], []
    for _ in range(args.steps):
        dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        topk_idx, topk_w, out, handle, t_exp = layer()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        expert_times.append(t_exp)

    # bytes of token rows that leave this rank: dispatch (bf16 rows) and combine (bf16 rows back)
    rows_out = int(handle.send_counts[:, 0].sum() - handle.send_counts[r, 0])
    rows_in = int(handle.num_recv_tokens - (handle.psum_num_recv_tokens_per_scaleup_rank[r]
                                            - (handle.psum_num_recv_tokens_per_scaleup_rank[r - 1] if r else 0)))
    moved = torch.tensor([(rows_out + rows_in) * H * 2], dtype=torch.float64, device=dev)
    dist.all_reduce(moved)

    gathered = [torch.empty_like(t) for t in (x, topk_idx, topk_w, out) for _ in range(R)]
    for j, t in enumerate((x, topk_idx, topk_w, out)):
        dist.all_gather(gathered[j * R:(j + 1) * R], t.contiguous())
    result = {"backend": buf.backend, "device": str(dev), "step_s": sorted(times)[len(times) // 2],
              "experts_s": sorted(expert_times)[len(expert_times) // 2], "bytes_moved": int(moved.item()),
              "waits": buf.get_wait_stats()}
    if r == 0:
        xs, idxs, ws, outs = (torch.cat(gathered[j * R:(j + 1) * R]) for j in range(4))
        dense = torch.zeros(xs.shape[0], H, dtype=torch.float32, device=dev)
        for e in range(E):
            rows, slots = (idxs == e).nonzero(as_tuple=True)
            if len(rows):
                w1, w2 = _expert_weights(args.seed, e, H, args.ffn, dev)
                dense.index_add_(0, rows, _mlp(xs[rows], w1, w2) * ws[rows, slots][:, None])
        err = (outs.float() - dense).abs()
        result.update(max_abs_err=err.max().item(),
                      rel_rms_err=(err.pow(2).mean().sqrt() / dense.pow(2).mean().sqrt().clamp(min=1e-30)).item())
    buf.destroy()
    return result


def _parse(argv, gpus: int):
    """The job's arguments, checked here in the parent: a bad one ends the program with one line and
    exit code 2 before any rank starts."""
    on_gpu = gpus >= 2
    p = argparse.ArgumentParser(prog="python -m tritonep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=gpus if on_gpu else 4,
                   help="ranks to spawn (every GPU when there are 2 or more, else CPU processes)")
    p.add_argument("--tokens", type=int, default=4096 if on_gpu else 32, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168 if on_gpu else 256,
                   help="hidden size (a multiple of 8: token rows of 16-byte multiples)")
    p.add_argument("--experts", type=int, default=256 if on_gpu else 16,
                   help="experts in all (a multiple of --ranks)")
    p.add_argument("--topk", type=int, default=8 if on_gpu else 4, help="experts per token")
    p.add_argument("--ffn", type=int, default=256 if on_gpu else 64, help="expert MLP width")
    p.add_argument("--steps", type=int, default=5 if on_gpu else 2, help="timed steps after one warm-up step")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs, gate and experts")
    p.add_argument("--backend", choices=["auto", "symmetric", "hybrid", "alltoall"], default=None,
                   help="tritonep backend; unset: TRITONEP_BACKEND, else auto")
    p.add_argument("--tolerance", type=float, default=2e-2, help="largest relative RMS error that passes")
    args = p.parse_args(argv)
    for name in ("ranks", "tokens", "hidden", "experts", "topk", "ffn", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if on_gpu and args.ranks > gpus:
        p.error(f"--ranks {args.ranks} exceeds the {gpus} GPUs here")
    if args.experts % args.ranks:
        p.error(f"--experts ({args.experts}) must be divisible by --ranks ({args.ranks})")
    if args.topk > args.experts:
        p.error(f"--topk ({args.topk}) must not exceed --experts ({args.experts})")
    if args.hidden % 8:
        p.error(f"--hidden ({args.hidden}) must be a multiple of 8 (token rows of 16-byte multiples)")
    if args.tolerance < 0:
        p.error(f"--tolerance must be >= 0, got {args.tolerance}")
    return args


def main(argv=None) -> int:
    from tritonep.testing.launch import parallel_launch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args = _parse(argv, gpus)
    on_gpu = gpus >= 2
    comm = "nccl" if on_gpu else "gloo"
    print(f"tritonep MoE layer: {args.ranks} ranks ({'GPUs, NCCL' if on_gpu else 'CPU processes, gloo'}), "
          f"{args.tokens} tokens/rank, hidden {args.hidden}, {args.experts} experts, top-{args.topk}, "
          f"ffn {args.ffn}", flush=True)
    print(f"  starting {args.ranks} ranks; the first step compiles the kernels"
          + ("" if on_gpu else " (CPU: the Triton interpreter, ~10-30 s)") + " ...", flush=True)
    results = parallel_launch(args.ranks, run, args, backend=comm)
    r0 = results[0]
    step = max(r["step_s"] for r in results)
    ok = r0["rel_rms_err"] <= args.tolerance
    print(f"  backend        {r0['backend']} on {r0['device']} (rank 0)")
    print(f"  bytes moved    {r0['bytes_moved'] / 1e6:.2f} MB per step (token rows crossing ranks, "
          f"dispatch + combine, all ranks)")
    print(f"  time per step  {step * 1e3:.2f} ms (median of {args.steps}; experts {r0['experts_s'] * 1e3:.2f} ms "
          f"on rank 0)")
    print(f"  max abs error  {r0['max_abs_err']:.3e} vs the dense layer (relative RMS {r0['rel_rms_err']:.2e})")
    waits = [r["waits"] for r in results]
    if all(w is not None and w["dispatches"] for w in waits):
        # each rank's mean wait for every peer's counts, per dispatch: a late or slow rank's column
        # is the largest (ElasticBuffer.get_wait_stats)
        worst = [max(range(len(w["wait_us"])), key=w["wait_us"].__getitem__) for w in waits]
        most = max(set(worst), key=worst.count)
        print("  waits          for peers' counts, mean per dispatch (us), rank by rank: "
              + "; ".join(" ".join(f"{u:.0f}" for u in w["wait_us"]) for w in waits)
              + f"; waited for most: rank {most}")
    print(f"  {'PASS' if ok else 'FAIL'}: relative RMS error {'<=' if ok else '>'} {args.tolerance:g}")
    return 0 if ok else 1
