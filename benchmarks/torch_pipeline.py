"""The pipeline a user writes without an EP library (Megatron's all-to-all token dispatcher, in
plain torch): the benchmark's second peer, measured on the same data and routing as tritonep.

Dispatch: send each token once to every rank that hosts one of its experts (rows ordered by
destination with one ``index_select``), exchange the counts (``all_to_all_single`` + one host
read), move the rows and their routing (two ``all_to_all_single``), then regroup the received rows
by local expert (one row per (token, local expert), experts in order). Combine reverses it: sum each
token's expert rows in fp32 (``index_add_``), send the partial sums back, and add them per token
at the origin (``index_add_`` in fp32, one rounding to bf16). It does not reproduce tritonep's
order of additions or metadata; it is a timing peer, not a reference.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass
class PipelineHandle:
    send_rows: torch.Tensor  # [S] token index of each sent row, ordered by destination
    send_splits: list
    recv_splits: list
    expert_order: torch.Tensor  # [G] received row of each expert-grouped row
    num_recv_tokens: int  # G: rows the experts get (the combine input's length)
    num_tokens: int  # n: tokens this rank dispatched


class TorchPipeline:
    """``dispatch``/``combine`` with the call shape of ``ElasticBuffer`` that bench_ep.py uses."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)

    def _a2a(self, rows: torch.Tensor, send_splits: list, recv_splits: list) -> torch.Tensor:
        out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows, recv_splits, send_splits, group=self.group)
        return out

    def dispatch(self, x, topk_idx=None, topk_weights=None, num_experts=None, handle=None, **_):
        data, sf = x if isinstance(x, tuple) else (x, None)
        # one byte row per token: data (+ scales), as a user packing FP8 would
        parts = [data.view(torch.uint8)] + ([sf.view(torch.uint8)] if sf is not None else [])
        rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if handle is None:
            R, L = self.num_ranks, num_experts // self.num_ranks
            n, k = topk_idx.shape
            valid = topk_idx >= 0
            dest = torch.where(valid, topk_idx // L, R)
            in_rank = torch.zeros((n, R + 1), dtype=torch.bool, device=topk_idx.device)
            in_rank.scatter_(1, dest, True)
            d_idx, t_idx = in_rank[:, :R].t().nonzero(as_tuple=True)  # by destination, then token
            send_counts = torch.bincount(d_idx, minlength=R)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
            send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
            # routing travels too: the local expert ids of every sent row
            ids = self._a2a(topk_idx.index_select(0, t_idx).to(torch.int32), send_splits, recv_splits)
            local = ids - self.rank * L
            mine = (ids >= 0) & (local >= 0) & (local < L)
            row, slot = mine.nonzero(as_tuple=True)
            order = torch.argsort(local[row, slot].to(torch.int64) * max(ids.shape[0], 1) + row, stable=True)
            handle = PipelineHandle(t_idx, send_splits, recv_splits, row[order], int(order.numel()), n)
        recv = self._a2a(rows.index_select(0, handle.send_rows), handle.send_splits, handle.recv_splits)
        grouped = recv.index_select(0, handle.expert_order)
        return grouped, None, None, handle, None

    def combine(self, y, handle, **_):
        H = y.shape[1]
        per_row = torch.zeros((sum(handle.recv_splits), H), dtype=torch.float32, device=y.device)
        per_row.index_add_(0, handle.expert_order, y.float())
        back = self._a2a(per_row.to(torch.bfloat16), handle.recv_splits, handle.send_splits)
        out = torch.zeros((handle.num_tokens, H), dtype=torch.float32, device=y.device)
        out.index_add_(0, handle.send_rows, back.float())
        return out.to(torch.bfloat16), None, None

    def destroy(self) -> None:
        pass
