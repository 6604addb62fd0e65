"""A torchtitan-style expert-parallel wrapper on tritonep: take a model's MoE module (router and
``GroupedExperts`` holding every expert, as torchtitan builds it), keep this rank's share of the
experts, and route its tokens through ``tritonep.ops`` dispatch and combine (differentiable,
``torch.compile``-friendly: static shapes, no host sync).

Run: python3 examples/torchtitan_ep.py [--ranks 2]   (spawns CPU ranks; no GPU needed)

The check: the parallelized module's output and its input and router gradients against the
unsharded module run on the same tokens in one process.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import tritonep.ops as ep_ops


class GroupedExperts(torch.nn.Module):
    """torchtitan's layout: ``w1``/``w3`` ``[E, dim, hidden]``, ``w2`` ``[E, hidden, dim]``; rows grouped
    by expert (``offsets``: each group's end)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(num_experts, dim, hidden, generator=g) / dim ** 0.5)
        self.w3 = torch.nn.Parameter(torch.randn(num_experts, dim, hidden, generator=g) / dim ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(num_experts, hidden, dim, generator=g) / hidden ** 0.5)

    def forward(self, x, offsets):
        group = torch.searchsorted(offsets, torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype), right=True)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.w1.shape[0]):
            h = F.silu(x.float() @ self.w1[e]) * (x.float() @ self.w3[e])
            out = torch.where((group == e)[:, None], h @ self.w2[e], out)
        return out


class MoE(torch.nn.Module):
    """Router (softmax, top-k) and experts; ``forward(x [n, dim])`` without parallelism: every
    expert here, tokens sorted by expert with torch operations."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.router = torch.nn.Linear(dim, num_experts, bias=False)
        torch.nn.init.normal_(self.router.weight, std=dim ** -0.5, generator=torch.Generator().manual_seed(1))
        self.experts, self.top_k, self.num_experts = GroupedExperts(dim, hidden, num_experts), top_k, num_experts

    def route(self, x):
        w, idx = torch.softmax(self.router(x.float()), dim=-1).topk(self.top_k, dim=-1)
        return idx, w

    def forward(self, x):
        idx, w = self.route(x)
        order = torch.argsort(idx.flatten(), stable=True)
        offsets = torch.cumsum(torch.bincount(idx.flatten(), minlength=self.num_experts), 0)
        y = self.experts(x[order // self.top_k], offsets) * w.flatten()[order][:, None]
        return torch.zeros(x.shape, dtype=torch.float32).index_add_(0, order // self.top_k, y).to(x.dtype)


def apply_expert_parallel(moe: MoE, buffer) -> MoE:
    """Keep this rank's experts and send tokens to theirs through ``buffer`` (torchtitan's
    ``ExpertParallel`` does this with all-to-alls around ``GroupedExperts``)."""
    R, r = buffer.num_ranks, buffer.rank_idx
    L = moe.num_experts // R
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            full = getattr(moe.experts, name)
            setattr(moe.experts, name, torch.nn.Parameter(full[r * L:(r + 1) * L].clone()))

    def forward(x):
        idx, w = moe.route(x)
        recv_x, _, recv_w, handle = ep_ops.dispatch(buffer, x, idx, w, num_experts=moe.num_experts, expand=True)
        y = moe.experts(recv_x, ep_ops.expert_offsets(handle)) * recv_w[:, None]
        return ep_ops.combine(buffer, y.to(torch.bfloat16), handle)

    moe.forward = forward
    return moe


def run(rank: int, group, num_ranks: int, tokens=16, dim=64, hidden=32, num_experts=8, top_k=2) -> float:
    from tritonep import ElasticBuffer

    reference = MoE(dim, hidden, num_experts, top_k)
    buffer = ElasticBuffer(group, num_max_tokens_per_rank=tokens, hidden=dim, num_topk=top_k)
    parallel = apply_expert_parallel(copy.deepcopy(reference), buffer)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    errors = []
    outs, grads = [], []
    for model in (parallel, reference):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.float().pow(2).sum().backward()
        outs.append(out.float())
        grads.append((xi.grad.float(), model.router.weight.grad))
    buffer.destroy()
    for got, want in [(outs[0], outs[1]), (grads[0][0], grads[1][0]), (grads[0][1], grads[1][1])]:
        errors.append(((got - want).norm() / want.norm()).item())
    return max(errors)


if __name__ == "__main__":
    from cpu_ranks import run_and_report

    run_and_report(run, __doc__, "torchtitan-style expert parallelism: output, input and router gradients against the unsharded module,")
