"""README's example as a program: one MoE layer's dispatch, local experts and combine, on every rank.

Run it on GPUs, one rank per GPU:        torchrun --nproc_per_node=2 examples/moe_layer.py
or with CPU processes (no GPU needed):   python3 examples/moe_layer.py [--ranks 2]

Each rank routes random tokens to top-k experts, dispatches them, runs its local experts (a
per-expert scale, weighted by the routing weights), combines, and checks the result against the
same layer computed on its own tokens alone.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from tritonep import ElasticBuffer, topk_idx_t


def run_local_experts(recv_x, recv_topk_idx, recv_topk_weights, scales):
    """``[M, hidden]`` bf16: the sum over this rank's experts ``e`` of a received token of
    ``weight * scales[e] * x`` (an "expert" that is a scale keeps the check exact to rounding)."""
    out = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    for slot in range(recv_topk_idx.shape[1]):
        local = recv_topk_idx[:, slot]
        mine = local >= 0
        factor = torch.where(mine, recv_topk_weights[:, slot] * scales[local.clamp(min=0)], 0.0)
        out += factor[:, None] * recv_x.float()
    return out.to(torch.bfloat16)


def moe_layer(group, device, num_tokens=256, hidden=1024, num_experts=16, num_topk=4) -> float:
    """One layer on this rank; returns the largest relative error against the dense computation."""
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(num_tokens, hidden, generator=g).to(torch.bfloat16).to(device)
    topk_idx = torch.rand(num_tokens, num_experts, generator=g).topk(num_topk, dim=1).indices
    topk_idx = topk_idx.to(topk_idx_t).to(device)
    topk_weights = torch.rand(num_tokens, num_topk, generator=g).to(device)
    all_scales = torch.linspace(0.5, 1.5, num_experts, device=device)  # every rank knows every expert
    local_experts = num_experts // num_ranks
    scales = all_scales[rank * local_experts:(rank + 1) * local_experts]

    buffer = ElasticBuffer(group, num_max_tokens_per_rank=num_tokens, hidden=hidden, num_topk=num_topk)
    recv_x, recv_topk_idx, recv_topk_weights, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts)
    # recv_x: [num_recv_tokens, hidden]; recv_topk_idx: local expert ids, -1 where the expert is elsewhere
    y = run_local_experts(recv_x, recv_topk_idx, recv_topk_weights, scales)  # weights applied here
    combined_x, _, _ = buffer.combine(y, handle)  # [num_tokens, hidden] bf16
    buffer.destroy()

    want = (topk_weights * all_scales[topk_idx]).sum(1, keepdim=True) * x.float()
    return ((combined_x.float() - want).norm() / want.norm()).item()


def _spawned(info, args):
    return moe_layer(info.group, info.device, args.tokens, args.hidden, args.experts, args.topk)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks to spawn (without torchrun)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    args = p.parse_args()
    if "RANK" in os.environ:  # started by torchrun: one GPU per rank (NCCL), else CPU ranks (gloo)
        cuda = torch.cuda.is_available() and torch.cuda.device_count() > int(os.environ["LOCAL_RANK"])
        for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
            os.environ.setdefault(k, v)  # NVLink multicast is not needed: keep it off
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        errors = [moe_layer(dist.group.WORLD, device, args.tokens, args.hidden, args.experts, args.topk)]
        dist.destroy_process_group()
    else:
        from tritonep.testing.launch import parallel_launch

        errors = parallel_launch(args.ranks, _spawned, args, backend="gloo")
    worst = max(errors)
    print(f"relative error against the dense layer: {worst:.2e} ({'PASS' if worst < 1e-2 else 'FAIL'})")
    raise SystemExit(0 if worst < 1e-2 else 1)


if __name__ == "__main__":
    main()
