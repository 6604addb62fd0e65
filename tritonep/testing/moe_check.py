"""Checks of ``tritonep.nn.MoE`` run inside each rank: the expert-parallel layer against the same
layer in one process (``buffer=None``, every rank's tokens), forward and gradients; a training step
under ``torch.compile(fullgraph=True)``; the forward captured in a CUDA graph and replayed.

Tolerances: the two layers compute every row alike, but each token's rows are summed in another
grouping (per rank then over ranks, against all at once), so outputs and gradients may differ by
bf16 roundings: ``atol = rtol = 2e-2``, against values of order 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..nn import MoE

TOL = dict(atol=2e-2, rtol=2e-2)


def _data(seed: int, rank: int, n: int, hidden: int):
    g = torch.Generator().manual_seed(seed * 31 + rank)
    return torch.randn(n, hidden, generator=g).to(torch.bfloat16), torch.randn(n, hidden, generator=g)


def _forward_backward(model: MoE, x, target, scale: float, fn=None):
    model.zero_grad(set_to_none=True)
    out = (fn if fn is not None else model)(x)
    loss = (out.float() - target).pow(2).sum() * scale
    loss.backward()
    return out.detach(), loss.detach()


def run_moe_check(buf, n: int, hidden: int, ffn: int, num_experts: int, top_k: int, seed: int = 5,
                  compile_backend: str | None = None, graph: bool = False, fp8_dispatch: bool = False) -> dict:
    """Raises AssertionError on a mismatch; returns what was checked."""
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    kw = dict(shared_ffn_hidden=ffn, seed=seed, device=dev, fp8_dispatch=fp8_dispatch)
    model = MoE(buf, hidden, ffn, num_experts, top_k, **kw)
    dense = MoE(None, hidden, ffn, num_experts, top_k, **kw)
    data = [_data(seed, s, n, hidden) for s in range(R)]
    x, target = (t.to(dev) for t in data[r])
    scale = 1.0 / (R * n * hidden)
    out, loss = _forward_backward(model, x, target, scale)
    for p in model.replicated_parameters():
        dist.all_reduce(p.grad, group=buf.group)
    xs, ts = (torch.cat(parts).to(dev) for parts in zip(*data))
    want, _ = _forward_backward(dense, xs, ts, scale)
    where = f"[rank {r}/{R}] "
    torch.testing.assert_close(out, want[r * n:(r + 1) * n], **TOL, msg=lambda m: where + "forward: " + m)
    L, lo = model.num_local_experts, model.first_expert
    grads = {"w13": (model.w13.grad, dense.w13.grad[lo:lo + L]), "w2": (model.w2.grad, dense.w2.grad[lo:lo + L]),
             "router": (model.router.grad, dense.router.grad),
             "shared w13": (model.shared["w13"].grad, dense.shared["w13"].grad)}
    for name, (got, exp) in grads.items():
        torch.testing.assert_close(got.float(), exp.float(), **TOL, msg=lambda m, name=name: where + f"{name}.grad: " + m)
    checked = {"forward and gradients": "close to the dense layer"}
    if compile_backend is not None:
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        c_out, c_loss = _forward_backward(model, x, target, scale, compiled)
        torch.testing.assert_close(c_out, out, **TOL, msg=lambda m: where + "compiled forward: " + m)
        for name in ("w13", "w2"):  # (this rank's own: the eager ones before any sum over ranks)
            torch.testing.assert_close(getattr(model, name).grad.float(), grads[name][0].float(), **TOL,
                                       msg=lambda m, name=name: where + f"compiled {name}.grad: " + m)
        checked["compiled"] = f"{compile_backend}, fullgraph"
    if graph:
        from .graph_check import capture_graph

        x_in = x.clone()
        with torch.no_grad():
            g, g_out = capture_graph(lambda: model(x_in))
            for i in range(2):
                new, _ = _data(seed + 100 + i, r, n, hidden)
                x_in.copy_(new)
                g.replay()
                torch.cuda.synchronize(dev)
                eager = model(x_in)
                assert torch.equal(g_out, eager), where + f"CUDA graph replay {i} differs from eager"
        checked["cuda graph"] = "2 replays equal to eager"
    return checked
