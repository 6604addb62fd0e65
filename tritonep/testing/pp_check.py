"""Checks of pipeline-parallel send/recv (``pp_*``), shared by the CPU and GPU tests: messages of
many sizes to both ring neighbours, interleaved and in bursts that fill every slot, each received
bit for bit in its pair's send order (two ranks: prev == next, one FIFO)."""
from __future__ import annotations

import torch


def message(s: int, d: int, i: int, device, scale: int = 1) -> torch.Tensor:
    """Message ``i`` from rank ``s`` to rank ``d``: ``8 * scale * [1, 128]`` float32 (a multiple of
    32 bytes), random."""
    g = torch.Generator().manual_seed(1000 * s + 10 * d + i)
    n = 8 * scale * int(torch.randint(1, 129, (1,), generator=g))
    return torch.randn(n, generator=g).to(device)


def run_pp_exchange(buf, rounds: int, inflight: int, scale: int = 1) -> dict:
    """Configure ``buf`` for messages of up to ``4096 * scale`` bytes and ``inflight`` slots, then
    exchange: ``rounds`` of (send next, send prev, receive prev, receive next), a burst of
    ``inflight`` sends before their receives, a reconfiguration, three more. Returns the counts.
    With two ranks (``prev == next``) a round sends twice before it receives: ``inflight >= 2``."""
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    prev, nxt = (r - 1) % R, (r + 1) % R
    buf.pp_set_config(4096 * scale, inflight)
    sent, got = {prev: 0, nxt: 0}, {prev: 0, nxt: 0}
    received = []

    def send(d):
        buf.pp_send(message(r, d, sent[d], dev, scale), d)
        sent[d] += 1

    def recv(s):
        want = message(s, r, got[s], dev, scale)
        out = torch.full_like(want, float("nan"))
        buf.pp_recv(out, s)
        received.append((s, got[s], out, want))
        got[s] += 1

    for _ in range(rounds):
        send(nxt)
        send(prev)
        recv(prev)
        recv(nxt)
    for _ in range(inflight):
        send(nxt)
    for _ in range(inflight):
        recv(prev)
    buf.pp_set_config(4096 * scale, max(inflight - 1, 1))  # nothing in flight: the counts carry on
    for _ in range(3):
        send(nxt)
        recv(prev)
    for s, i, out, want in received:  # checked at the end: the receives are asynchronous on GPUs
        if not torch.equal(out.view(torch.int32), want.view(torch.int32)):
            raise AssertionError(f"rank {r}: message {i} from rank {s} differs from what was sent")
    return dict(sent=sum(sent.values()), got=sum(got.values()))
