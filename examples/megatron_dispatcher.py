"""A Megatron-style token dispatcher on tritonep: the six steps of Megatron-core's
``MoEFlexTokenDispatcher`` (``dispatch_preprocess``, ``token_dispatch``, ``dispatch_postprocess``,
``combine_preprocess``, ``token_combine``, ``combine_postprocess``) over ``tritonep.ops``, which
differentiates through dispatch and combine.

Run: python3 examples/megatron_dispatcher.py [--ranks 2]   (spawns CPU ranks; no GPU needed)

Each rank routes its tokens (a routing map and probabilities, as Megatron's router gives them),
runs its local experts (one matrix each) on the rows the dispatcher hands it, grouped by expert,
and the dispatcher brings the weighted outputs back. The check: the output and the gradient of
the input against the same layer computed on this rank alone with every expert's matrix.
"""
from __future__ import annotations


import torch

import tritonep.ops as ep_ops


class TritonepTokenDispatcher:
    """The interface of Megatron's ``MoEFlexTokenDispatcher``; ``buffer``: an ``ElasticBuffer``
    over the expert-parallel group, built with ``num_max_tokens_per_rank``."""

    def __init__(self, buffer, num_experts: int, router_topk: int, expert_alignment: int = 1):
        self.buffer, self.num_experts, self.topk = buffer, num_experts, router_topk
        self.num_local_experts = num_experts // buffer.num_ranks
        self.expert_alignment = expert_alignment
        self.handle = None

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """``[*, H]`` tokens, ``routing_map`` ``[n, E]`` bool (``router_topk`` set per row),
        ``probs`` ``[n, E]``: the tokens as rows and their top-k (ids, weights)."""
        self.hidden_shape = hidden_states.shape
        topk_idx = torch.topk(routing_map.to(torch.int8), self.topk, dim=1).indices
        return hidden_states.reshape(-1, self.hidden_shape[-1]), (topk_idx, probs.gather(1, topk_idx).float())

    def token_dispatch(self, hidden_states, probs, async_finish: bool = True, allocate_on_comm_stream: bool = True):
        """Every token to the ranks of its experts, one row per (token, local expert)."""
        topk_idx, topk_weights = probs
        recv_x, _, recv_w, self.handle = ep_ops.dispatch(self.buffer, hidden_states, topk_idx, topk_weights,
                                                         num_experts=self.num_experts, expand=True,
                                                         expert_alignment=self.expert_alignment)
        return recv_x, recv_w

    def dispatch_postprocess(self, hidden_states, probs):
        """``(rows grouped by local expert, tokens per expert [L] (aligned, on the device), their
        probabilities)``: tritonep's expanded rows are already grouped (rows past the last group
        are zero)."""
        offs = ep_ops.expert_offsets(self.handle)
        return hidden_states, torch.diff(offs, prepend=offs.new_zeros(1)), probs

    def combine_preprocess(self, hidden_states):
        return hidden_states  # (the rows are in the dispatch's order already)

    def token_combine(self, hidden_states, async_finish: bool = True, allocate_on_comm_stream: bool = True):
        out = ep_ops.combine(self.buffer, hidden_states.to(torch.bfloat16), self.handle)
        self.handle = None
        return out

    def combine_postprocess(self, hidden_states):
        return hidden_states.view(self.hidden_shape)


def experts_forward(rows, tokens_per_expert, probs, weights):
    """Megatron's experts: each local expert's rows through its matrix, scaled by the probabilities."""
    ends = torch.cumsum(tokens_per_expert, 0)
    group = torch.searchsorted(ends, torch.arange(rows.shape[0], device=rows.device), right=True)
    out = torch.zeros_like(rows, dtype=torch.float32)
    for e in range(weights.shape[0]):
        out = torch.where((group == e)[:, None], rows.float() @ weights[e].float(), out)
    return out * probs[:, None]


def layer(rank: int, group, num_ranks: int, tokens=16, hidden=64, num_experts=8, topk=2):
    from tritonep import ElasticBuffer

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(2, tokens // 2, hidden, generator=g).to(torch.bfloat16).requires_grad_(True)
    probs = torch.softmax(torch.randn(tokens, num_experts, generator=g), dim=1)
    routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(topk, dim=1).indices, True)
    all_weights = torch.randn(num_experts, hidden, hidden, generator=torch.Generator().manual_seed(99)) / hidden ** 0.5
    L = num_experts // num_ranks
    weights = all_weights[rank * L:(rank + 1) * L].to(torch.bfloat16)

    buffer = ElasticBuffer(group, num_max_tokens_per_rank=tokens, hidden=hidden, num_topk=topk)
    d = TritonepTokenDispatcher(buffer, num_experts, topk)
    rows, p = d.dispatch_preprocess(x, routing_map, probs)
    rows, p = d.token_dispatch(rows, p)
    rows, tokens_per_expert, p = d.dispatch_postprocess(rows, p)
    y = experts_forward(rows, tokens_per_expert, p, weights)
    out = d.combine_postprocess(d.token_combine(d.combine_preprocess(y)))
    out.float().sum().backward()
    buffer.destroy()

    # the same layer on this rank alone, every expert's matrix at hand
    xr = x.detach().reshape(tokens, hidden).float().requires_grad_(True)
    want = sum(torch.where(routing_map[:, e:e + 1], probs[:, e:e + 1] * (xr @ all_weights[e].to(torch.bfloat16).float()),
                           0.0) for e in range(num_experts))
    want.sum().backward()
    err_out = ((out.float().reshape(tokens, hidden) - want).norm() / want.norm()).item()
    err_grad = ((x.grad.float().reshape(tokens, hidden) - xr.grad).norm() / xr.grad.norm()).item()
    return max(err_out, err_grad)


if __name__ == "__main__":
    from cpu_ranks import run_and_report

    run_and_report(layer, __doc__, "Megatron-style dispatcher: output and input gradient against the layer computed on each rank alone,")
