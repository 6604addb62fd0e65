"""Input checks of the public API: each raises ``TypeError``/``ValueError`` naming the offending
values, before any kernel runs, so a rejected call leaves the buffer usable.

Vocabulary as in :mod:`tritonep.buffer` (n tokens, H hidden, k top-k, E experts, R ranks, T
``num_max_tokens_per_rank``).
"""
from __future__ import annotations

import torch

from . import sizing

topk_idx_t = torch.int64
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
#: DeepEP's limits (spec 10.2); the per-source count header is sized for MAX_LOCAL_EXPERTS.
MAX_EXPERTS = 2048


def require_tensor(name: str, t, ndim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but this buffer's ranks use {device}")


def require_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def require_weights(t, shape: tuple, device: torch.device) -> None:
    """``topk_weights``: float32, contiguous, of ``shape``."""
    require_tensor("topk_weights", t, len(shape), device)
    if t.dtype != torch.float32:
        raise TypeError(f"topk_weights must be torch.float32, got {t.dtype}")
    require_contiguous("topk_weights", t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"topk_weights must be {list(shape)}, got {list(t.shape)}")


def parse_x(x, device: torch.device):
    """Dispatch's ``x`` as ``(data [n, H], sf [n, P] or None)`` after dtype/shape checks."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"an FP8 x must be a pair (data, scales), got {len(x)} items")
        data, sf = x
        require_tensor("x[0] (FP8 data)", data, 2, device)
        if data.dtype not in FP8_DTYPES:
            raise TypeError(f"x[0] (FP8 data) must be float8_e4m3fn or float8_e5m2, got {data.dtype}")
        require_tensor("x[1] (scales)", sf, 2, device)
        if sf.element_size() != 4:
            raise TypeError(f"x[1] (scales) must have 4-byte elements (float32 or int32), got {sf.dtype}")
        if sf.shape[0] != data.shape[0]:
            raise ValueError(f"x[1] (scales) has {sf.shape[0]} rows but x[0] has {data.shape[0]}")
    else:
        data, sf = x, None
        require_tensor("x", data, 2, device)
        if data.dtype != torch.bfloat16:
            raise TypeError(f"x must be torch.bfloat16 (or an FP8 (data, scales) pair), got {data.dtype}")
    require_contiguous("x", data)
    return data, sf


def check_tokens(n: int, T: int, hidden: int, row_bytes: int, buffer_hidden: int) -> None:
    if n > T:
        raise ValueError(f"x has {n} tokens, more than num_max_tokens_per_rank ({T})")
    if buffer_hidden and hidden != buffer_hidden:
        raise ValueError(f"x has hidden size {hidden}, but this buffer was built for hidden={buffer_hidden}")
    if row_bytes % 16:
        raise ValueError(f"a token row must be a multiple of 16 bytes; hidden={hidden} gives {row_bytes}")


def check_topk(topk_idx, topk_weights, n: int, num_experts: int, device: torch.device,
               check_values: bool = True) -> None:
    """Shape and dtype of ``topk_idx`` (and ``topk_weights``); with ``check_values`` also the ids
    (read on the host: one sync)."""
    require_tensor("topk_idx", topk_idx, 2, device)
    if topk_idx.dtype != topk_idx_t:
        raise TypeError(f"topk_idx must be {topk_idx_t} (tritonep.topk_idx_t), got {topk_idx.dtype}")
    require_contiguous("topk_idx", topk_idx)
    if topk_idx.shape[0] != n:
        raise ValueError(f"topk_idx has {topk_idx.shape[0]} rows but x has {n} tokens")
    if topk_idx.shape[1] < 1:
        raise ValueError("topk_idx must have at least one column")
    if topk_weights is not None:
        require_weights(topk_weights, topk_idx.shape, device)
    if n == 0 or not check_values:
        return
    # One host read for both value checks (spec 2.1: any negative id is an empty slot).
    srt = topk_idx.sort(dim=1).values
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
    hi, has_dup = torch.stack([topk_idx.max(), dup.to(torch.int64)]).tolist()
    if hi >= num_experts:
        raise ValueError(f"topk_idx holds expert id {hi}, but num_experts is {num_experts} (ids must be < it)")
    if has_dup:
        raise ValueError("topk_idx selects the same expert twice in one row")


def check_num_experts(num_experts, num_ranks: int) -> int:
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the number of ranks ({num_ranks})")
    if num_experts > MAX_EXPERTS or num_experts // num_ranks > sizing.MAX_LOCAL_EXPERTS:
        raise ValueError(f"num_experts ({num_experts}) exceeds the limits: at most {MAX_EXPERTS} experts and "
                         f"{sizing.MAX_LOCAL_EXPERTS} per rank")
    return num_experts


def check_stats(stats, num_local_experts: int, device: torch.device) -> None:
    """``cumulative_local_expert_recv_stats``: ``[L]`` int32, contiguous."""
    require_tensor("cumulative_local_expert_recv_stats", stats, 1, device)
    if stats.dtype != torch.int32:
        raise TypeError(f"cumulative_local_expert_recv_stats must be torch.int32, got {stats.dtype}")
    if stats.shape[0] != num_local_experts:
        raise ValueError(f"cumulative_local_expert_recv_stats must have {num_local_experts} entries (local experts), "
                         f"got {stats.shape[0]}")
    require_contiguous("cumulative_local_expert_recv_stats", stats)


def parse_bias(bias, n: int, hidden: int, device: torch.device) -> tuple:
    """Combine's ``bias`` (None, a tensor, or a pair) as a tuple of 0-2 ``[n, H]`` bf16 tensors."""
    if bias is None:
        return ()
    if isinstance(bias, torch.Tensor):
        bias = (bias,)
    elif not isinstance(bias, (tuple, list)) or len(bias) not in (1, 2):
        raise ValueError("bias must be None, a tensor, or a pair of tensors")
    for i, b in enumerate(bias):
        require_tensor(f"bias[{i}]", b, 2, device)
        if b.dtype != torch.bfloat16:
            raise TypeError(f"bias[{i}] must be torch.bfloat16, got {b.dtype}")
        require_contiguous(f"bias[{i}]", b)
        if tuple(b.shape) != (n, hidden):
            raise ValueError(f"bias[{i}] must be [{n}, {hidden}], got {tuple(b.shape)}")
    return tuple(bias)


def check_positive_int(name: str, value, hint: str = "") -> int:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}{hint}")
    return value


def check_cached(handle, n: int, topk_idx, do_cpu_sync, values: dict) -> None:
    """The rules of a cached dispatch (spec 2.8): no ``topk_idx``, no CPU sync, the same settings
    (``values``: name -> the call's value or None) and token count as the handle's."""
    if topk_idx is not None:
        raise ValueError("cached dispatch (handle given) takes no topk_idx: the handle's is reused")
    if do_cpu_sync:
        raise ValueError("cached dispatch (handle given) never syncs with the CPU: do_cpu_sync must not be True")
    for name, value in values.items():
        expected = getattr(handle, name)
        if value is not None and value != expected:
            raise ValueError(f"{name} ({value}) differs from the handle's ({expected})")
    if n != handle.topk_idx.shape[0]:
        raise ValueError(f"x has {n} tokens but the handle was made for {handle.topk_idx.shape[0]}")
