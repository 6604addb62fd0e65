"""Checks of the all-gather sessions (and reduce-scatter), shared by the CPU and GPU tests: a random
schedule as DeepEP's AGRS test makes it (all-gathers of one tensor or several, half of them in
place, fetched later, sessions ended and begun when nothing is in flight), every output equal to
the stack of every rank's tensor, bit for bit."""
from __future__ import annotations

import random

import torch


def tensor_of(i: int, q: int, shape: tuple, dtype, device) -> torch.Tensor:
    """Tensor ``i`` of rank ``q`` (DeepEP's seeds: ``42 + 43 i + q``)."""
    g = torch.Generator().manual_seed(42 + 43 * i + q)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def run_agrs_schedule(buf, seed: int, num_ops: int, shape: tuple, max_calls: int, dtype=torch.bfloat16) -> int:
    """All-gather ``num_ops`` tensors on a random schedule (the same on every rank); returns the
    number of sessions used."""
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    rng = random.Random(seed)
    pending, done, sessions, calls = [], 0, 1, 0
    buf.create_agrs_session()
    i = 0
    while done < num_ops:
        action = rng.random()
        if i < num_ops and action < 0.6:
            n = rng.randint(1, min(3, num_ops - i))
            inplace, batched = rng.random() < 0.5, rng.random() < 0.8
            if calls + (1 if batched else n) > max_calls:  # the session is full
                if not pending:
                    buf.destroy_agrs_session()
                    buf.create_agrs_session()
                    sessions, calls = sessions + 1, 0
                continue
            ids = list(range(i, i + n))
            i += n
            for g in [ids] if batched else [[j] for j in ids]:
                ts = [tensor_of(j, r, shape, dtype, dev) for j in g]
                if inplace:
                    views = buf.agrs_get_inplace_tensor([shape] * len(g) if batched else shape, dtype)
                    views = list(views) if batched else [views]
                    for v, t in zip(views, ts):
                        v.copy_(t)
                    ts = views
                res = buf.all_gather(ts if batched else ts[0])
                calls += 1
                pending.append((g, res[:-1], res[-1]))
        elif pending and action < 0.9:
            g, outs, wait = pending.pop(rng.randrange(len(pending)))
            wait()
            for j, out in zip(g, outs):
                want = torch.stack([tensor_of(j, q, shape, dtype, dev) for q in range(R)])
                if not torch.equal(out.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                                   want.view(torch.int16 if dtype.itemsize == 2 else torch.int32)):
                    raise AssertionError(f"rank {r}: all_gather of tensor {j} differs from the stack of the ranks'")
                done += 1
        elif not pending:
            buf.destroy_agrs_session()
            buf.create_agrs_session()
            sessions, calls = sessions + 1, 0
    buf.destroy_agrs_session()
    return sessions


def run_reduce_scatter(buf, seed: int, shape: tuple, dtype=torch.bfloat16) -> None:
    """``reduce_scatter`` of ``[R, *shape]`` against the fp32 sum in rank order, bit for bit."""
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    ins = [tensor_of(seed, q, (R, *shape), dtype, dev) for q in range(R)]
    with buf.agrs_new_session():
        out, wait = buf.reduce_scatter(ins[r])
        wait()
        acc = ins[0][r].float()
        for q in range(1, R):
            acc = acc + ins[q][r].float()
        if not torch.equal(out, acc.to(dtype)):
            raise AssertionError(f"rank {r}: reduce_scatter differs from the fp32 sum in rank order")
