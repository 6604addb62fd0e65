"""The main job: a few training steps of an expert-parallel MoE layer across ranks, checked against
the same layer trained densely in one process.

Each rank holds its share of the experts of a ``tritonep.nn.MoE`` layer (router, top-k, SwiGLU
experts, a shared expert) and its own tokens; a step is forward (dispatch, experts, combine),
a mean squared error against fixed targets, backward through the operators (the gradients of
combine and dispatch cross the ranks), the replicated parameters' gradients summed over the
ranks, and an SGD update. The parent process then trains the same layer (same seed) with
every rank's tokens in one process and compares the losses step by step.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist


def _data(seed: int, rank: int, n: int, hidden: int):
    """``(x [n, hidden] bf16, target [n, hidden] float32)`` of one rank."""
    g = torch.Generator().manual_seed(seed * 31 + rank)
    return torch.randn(n, hidden, generator=g).to(torch.bfloat16), torch.randn(n, hidden, generator=g)


def _layer(buffer, args, device):
    from tritonep.nn import MoE

    return MoE(buffer, args.hidden, args.ffn, args.experts, args.topk, shared_ffn_hidden=args.ffn, device=device,
               seed=args.seed)


def _step(model, x, target, scale: float, lr: float, group=None) -> torch.Tensor:
    """One training step; returns this process's share of the loss (summed over ranks: the loss)."""
    model.zero_grad(set_to_none=True)
    loss = (model(x).float() - target).pow(2).sum() * scale
    loss.backward()
    if group is not None:
        for p in model.replicated_parameters():
            dist.all_reduce(p.grad, group=group)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p.float() - lr * p.grad.float()).to(p.dtype))
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(info, args) -> dict:
    from tritonep import ElasticBuffer

    dev, r, R = info.device, info.rank, info.world_size
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=args.tokens, hidden=args.hidden, num_topk=args.topk,
                        backend=args.backend, explicitly_destroy=True)
    model = _layer(buf, args, dev)
    x, target = (t.to(dev) for t in _data(args.seed, r, args.tokens, args.hidden))
    scale = 1.0 / (R * args.tokens * args.hidden)
    losses, times = [], []
    for i in range(args.steps):
        dist.barrier()
        _sync(dev)
        t0 = time.perf_counter()
        loss = _step(model, x, target, scale, args.lr, info.group)
        dist.all_reduce(loss, group=info.group)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if r == 0:
            print(f"  step {i + 1}/{args.steps}  loss {losses[-1]:.6f}  ({times[-1] * 1e3:.0f} ms"
                  + (", compiles the kernels" if i == 0 else "") + ")", flush=True)
    result = {"backend": buf.backend, "device": str(dev), "losses": losses,
              "step_s": sorted(times[1:] or times)[len(times[1:] or times) // 2], "waits": buf.get_wait_stats()}
    buf.destroy()
    return result


def dense_losses(args, device) -> list:
    """The same layer and steps in one process, every rank's tokens at once."""
    model = _layer(None, args, device)
    data = [_data(args.seed, r, args.tokens, args.hidden) for r in range(args.ranks)]
    x, target = (torch.cat(parts).to(device) for parts in zip(*data))
    scale = 1.0 / (args.ranks * args.tokens * args.hidden)
    return [_step(model, x, target, scale, args.lr).item() for _ in range(args.steps)]


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
    p.add_argument("--ffn", type=int, default=256 if on_gpu else 64, help="expert MLP width (and the shared expert's)")
    p.add_argument("--steps", type=int, default=5 if on_gpu else 3, help="training steps")
    p.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs, gate and experts")
    p.add_argument("--backend", choices=["auto", "symmetric"], default=None,
                   help="tritonep backend (tritonep.ops needs the symmetric one); unset: TRITONEP_BACKEND, else auto")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest relative difference of a step's loss from the dense layer's that passes")
    args = p.parse_args(argv)
    for name in ("ranks", "tokens", "hidden", "experts", "topk", "ffn", "steps", "lr"):
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
    print(f"tritonep MoE training: {args.ranks} ranks ({'GPUs, NCCL' if on_gpu else 'CPU processes, gloo'}), "
          f"{args.tokens} tokens/rank, hidden {args.hidden}, {args.experts} experts, top-{args.topk}, "
          f"ffn {args.ffn} (and a shared expert), {args.steps} SGD steps", flush=True)
    print(f"  starting {args.ranks} ranks; the first step compiles the kernels"
          + ("" if on_gpu else " (CPU: the Triton interpreter, ~10-30 s)") + " ...", flush=True)
    results = parallel_launch(args.ranks, run, args, backend=comm)
    r0 = results[0]
    dense = dense_losses(args, torch.device("cuda", 0) if on_gpu else torch.device("cpu"))
    diffs = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r0["losses"], dense)]
    ok = max(diffs) <= args.tolerance
    print(f"  backend        {r0['backend']} on {r0['device']} (rank 0)")
    print(f"  time per step  {max(r['step_s'] for r in results) * 1e3:.2f} ms (median after the first; forward, "
          "backward, gradient sums, update)")
    print("  dense layer    losses " + " ".join(f"{v:.6f}" for v in dense) + " (one process, every rank's tokens)")
    print(f"  largest diff   {max(diffs):.2e} relative, step by step")
    waits = [r["waits"] for r in results]
    if all(w is not None and w["dispatches"] for w in waits):
        # each rank's mean wait for every peer's counts, per dispatch: a late or slow rank's column
        # is the largest (ElasticBuffer.get_wait_stats)
        worst = [max(range(len(w["wait_us"])), key=w["wait_us"].__getitem__) for w in waits]
        most = max(set(worst), key=worst.count)
        print("  waits          for peers' counts, mean per dispatch (us), rank by rank: "
              + "; ".join(" ".join(f"{u:.0f}" for u in w["wait_us"]) for w in waits)
              + f"; waited for most: rank {most}")
    print(f"  {'PASS' if ok else 'FAIL'}: every step's loss within {args.tolerance:g} (relative) of the dense layer's")
    return 0 if ok else 1
