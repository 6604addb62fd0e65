"""``tritonep.nn.MoE``: a DeepSeek-V3-style mixture-of-experts layer over :mod:`tritonep.ops`.

Router (fp32 linear, sigmoid or softmax scores, top-k, weights normalized over the k and scaled),
the experts as SwiGLU MLPs held by the ranks (``L = E / R`` each, as grouped GEMMs over the
expanded rows: ``torch._grouped_mm`` on GPUs that have it, one masked matmul per local expert
elsewhere), an optional shared expert (every rank holds a copy), dispatch and combine as the
differentiable operators of :mod:`tritonep.ops`: usable in a training loop, under
``torch.compile`` and in a CUDA graph (static shapes, no host sync).

``buffer=None`` is the same layer in one process: every expert local, the expanded rows made with
torch operations: the dense reference a test or a user compares with (same parameters for the
same seed, see :meth:`MoE.reset_parameters`).

Training across ranks: the expert parameters are this rank's own (their gradients already hold
every rank's tokens: the operators' backward sends them); the router's and the shared expert's are
replicas, so sum their gradients over the ranks before the optimizer step
(:meth:`MoE.replicated_parameters`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .reference import quantize_fp8


def _grouped_mm_ok(x: Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(x.device)[0] >= 9


def swiglu_experts(x: Tensor, w13: Tensor, w2: Tensor, offs: Tensor) -> Tensor:
    """``[M, H]`` bf16 rows grouped by expert (``offs``: ``[L]`` int32 row ends) through the
    experts' SwiGLU MLPs (``w13`` ``[L, H, 2F]``, ``w2`` ``[L, F, H]`` bf16); rows past
    ``offs[-1]`` come out zero."""
    if _grouped_mm_ok(x):
        h = torch._grouped_mm(x, w13, offs=offs)
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm((F.silu(gate.float()) * up.float()).to(x.dtype), w2, offs=offs)
        rows = torch.arange(x.shape[0], device=x.device)
        return torch.where((rows < offs[-1])[:, None], y, 0)
    rows = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
    expert = torch.searchsorted(offs, rows, right=True)  # L for rows past the last expert
    y = torch.zeros_like(x)
    for i in range(w13.shape[0]):  # every row through every expert, masked: static shapes, no host sync
        gate, up = (x @ w13[i]).chunk(2, dim=-1)
        out = (F.silu(gate.float()) * up.float()).to(x.dtype) @ w2[i]
        y = torch.where((expert == i)[:, None], out, y)
    return y


class MoE(torch.nn.Module):
    """``forward(x [n, hidden] bf16) -> [n, hidden] bf16``; see the module docstring.

    ``buffer``: an ``ElasticBuffer`` built with ``num_max_tokens_per_rank >= n`` (None: the layer
    in one process); ``num_experts`` in all (a multiple of the ranks); ``score_func``
    ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"``; ``route_scale`` multiplies the normalized
    weights; ``expert_alignment``: rows per expert rounded up to it (16 on GPUs: grouped GEMM
    tiles); ``num_max_recv_tokens``: the bounded expanded rows (:func:`tritonep.recv_capacity`
    with ``expand=True``); ``fp8_dispatch``: tokens travel as FP8 (half the bytes; the experts
    get them back in bf16, the gradient passes the cast)."""

    def __init__(self, buffer, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, *,
                 shared_ffn_hidden: int = 0, score_func: str = "sigmoid", route_scale: float = 1.0,
                 expert_alignment: int | None = None, num_max_recv_tokens: int | None = None,
                 fp8_dispatch: bool = False, device=None, seed: int = 0):
        super().__init__()
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
        R = buffer.num_ranks if buffer is not None else 1
        if num_experts % R:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the {R} ranks")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        device = torch.device(device) if device is not None else (buffer.device if buffer is not None else None)
        self.buffer, self.hidden, self.ffn_hidden = buffer, hidden, ffn_hidden
        self.num_experts, self.top_k, self.score_func, self.route_scale = num_experts, top_k, score_func, route_scale
        self.num_local_experts = num_experts // R
        self.first_expert = (buffer.rank_idx if buffer is not None else 0) * self.num_local_experts
        on_gpu = device is not None and device.type == "cuda"
        self.expert_alignment = expert_alignment or (16 if on_gpu else 1)
        self.num_max_recv_tokens, self.fp8_dispatch = num_max_recv_tokens, fp8_dispatch
        L = self.num_local_experts
        self.router = torch.nn.Parameter(torch.empty(num_experts, hidden, device=device))
        self.w13 = torch.nn.Parameter(torch.empty(L, hidden, 2 * ffn_hidden, dtype=torch.bfloat16, device=device))
        self.w2 = torch.nn.Parameter(torch.empty(L, ffn_hidden, hidden, dtype=torch.bfloat16, device=device))
        self.shared = None
        if shared_ffn_hidden:
            self.shared = torch.nn.ParameterDict({
                "w13": torch.nn.Parameter(torch.empty(hidden, 2 * shared_ffn_hidden, dtype=torch.bfloat16,
                                                      device=device)),
                "w2": torch.nn.Parameter(torch.empty(shared_ffn_hidden, hidden, dtype=torch.bfloat16, device=device))})
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Every parameter from ``seed`` and the global expert id, so that every rank count (and
        ``buffer=None``) holds the same layer."""
        def randn(shape, salt, fan_in):
            g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
            return torch.randn(shape, generator=g) / fan_in ** 0.5

        H, Fh = self.hidden, self.ffn_hidden
        self.router.copy_(randn((self.num_experts, H), 1, H))
        for i in range(self.num_local_experts):
            e = self.first_expert + i
            self.w13[i].copy_(randn((H, 2 * Fh), 1000 + 2 * e, H))
            self.w2[i].copy_(randn((Fh, H), 1001 + 2 * e, Fh))
        if self.shared is not None:
            S = self.shared["w2"].shape[0]
            self.shared["w13"].copy_(randn((H, 2 * S), 2, H))
            self.shared["w2"].copy_(randn((S, H), 3, S))

    def replicated_parameters(self) -> list:
        """The parameters every rank holds a copy of (sum their gradients over the ranks)."""
        return [self.router] + (list(self.shared.values()) if self.shared is not None else [])

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(topk_idx [n, k] int64, topk_weights [n, k] float32)``."""
        logits = F.linear(x.float(), self.router)
        scores = torch.sigmoid(logits) if self.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
        w, idx = scores.topk(self.top_k, dim=-1)
        return idx, w / w.sum(dim=-1, keepdim=True) * self.route_scale

    def forward(self, x: Tensor) -> Tensor:
        idx, w = self.route(x)
        if self.buffer is None:
            out = self._local(x, idx, w)
        else:
            recv_x, _, recv_w, handle = ops.dispatch(self.buffer, x, idx, w, num_experts=self.num_experts, expand=True,
                                                     expert_alignment=self.expert_alignment,
                                                     num_max_recv_tokens=self.num_max_recv_tokens,
                                                     fp8=self.fp8_dispatch)
            y = swiglu_experts(recv_x, self.w13, self.w2, ops.expert_offsets(handle))
            out = ops.combine(self.buffer, (y.float() * recv_w[:, None]).to(torch.bfloat16), handle)
        if self.shared is not None:
            gate, up = (x @ self.shared["w13"]).chunk(2, dim=-1)
            out = out + (F.silu(gate.float()) * up.float()).to(x.dtype) @ self.shared["w2"]
        return out

    def _local(self, x: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        """``buffer=None``: the expanded rows by torch operations (rows by expert, then token), the
        same experts, each token's rows summed in fp32 in slot order."""
        n, k = idx.shape
        if self.fp8_dispatch:  # the experts see what an FP8 dispatch delivers (the gradient passes the cast)
            x = x + (ops.dequantize_fp8(*quantize_fp8(x.detach())) - x).detach()
        order = torch.argsort(idx.flatten() * n + torch.arange(n, device=x.device).repeat_interleave(k), stable=True)
        tokens = order // k
        counts = torch.bincount(idx.flatten(), minlength=self.num_experts)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        y = swiglu_experts(x[tokens], self.w13, self.w2, offs)
        scaled = y.float() * w.flatten()[order][:, None]
        rows = torch.empty_like(scaled)
        rows[order] = scaled  # back to (token, slot) order
        return rows.view(n, k, -1).to(torch.bfloat16).float().sum(dim=1).to(torch.bfloat16)


__all__ = ["MoE", "swiglu_experts"]
