"""Sweep the tile shapes of the row kernels on GPUs, one ``tritonep.KernelConfig`` per candidate.

Run: torchrun --nproc_per_node=2 benchmarks/tune_tiles.py [--tokens 8192] [--num-sms 24]

For each candidate (the group's defaults first): a buffer built with that config, the time per call
of cached FP8 dispatches and of BF16 combines queued back to back (``bench_ep.py``'s ``[b2b]``
columns: GPU-bound, so steadier than one call's median for comparing kernels), and a bitwise check
that the outputs equal those of the defaults (tile shapes must never change results). A winner
goes into ``tritonep/config.py``'s ``DEFAULTS``, with the measurement in docs/configuration.md.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from bench_ep import _time_back_to_back, init_ranks

#: candidates: the KernelConfig fields each one sets (the rest stay at the group's defaults)
CANDIDATES = [
    {},
    *({"dispatch_push_tile": t} for t in ((16, 512, 8), (64, 256, 8), (32, 512, 8), (32, 256, 4))),
    *({"dispatch_copy_out_tile": t} for t in ((32, 512, 8), (16, 1024, 8), (64, 512, 16))),
    *({"combine_push_tile": t} for t in ((16, 512, 8), (32, 512, 8))),
    *({"combine_reduce_tile": t} for t in ((8, 1024, 8), (16, 512, 8))),
    *({"combine_dense_reduce_tile": t} for t in ((16, 1024, 8), (32, 512, 16))),
    *({"combine_dense_send_tile": t} for t in ((32, 256), (64, 256))),
    *({"sender_share": s} for s in (0.625, 0.75)),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    args = p.parse_args()
    rank, device = init_ranks()
    if device.type != "cuda":
        raise SystemExit("this tool measures GPUs: run it with torchrun on a machine with one GPU per rank")
    from tritonep import KernelConfig, ElasticBuffer
    from tritonep.testing.gate import make_topk

    n, H, E, K = args.tokens, 7168, 256, 8
    topk = make_topk(7, rank, n, E, K).to(device)
    w = torch.rand(n, K, device=device)
    x = (torch.randn(n, H, device=device).clamp(-448, 448).to(torch.float8_e4m3fn),
         torch.rand(n, H // 128, device=device))
    y = None
    kw = dict(num_sms=args.num_sms)
    rows, ref = [], {}

    def b2b(fn):
        for _ in range(args.warmup):
            fn()
        return _time_back_to_back(fn, args.iters, True)

    for fields in CANDIDATES:
        buf = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=n, hidden=H, num_topk=K, backend="symmetric",
                            explicitly_destroy=True, num_gpu_timeout_secs=20, config=KernelConfig(**fields))
        out = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, **kw)
        handle = out[3]
        if y is None:
            y = torch.randn(handle.num_recv_tokens, H, device=device).to(torch.bfloat16)
        got_d = buf.dispatch(x, handle=handle, **kw)[0][0].view(torch.uint8).clone()
        got_c = buf.combine(y, handle, **kw)[0].clone()
        if not ref:
            ref.update(d=got_d, c=got_c)
        same = torch.equal(got_d, ref["d"]) and torch.equal(got_c, ref["c"])
        t_d = b2b(lambda: buf.dispatch(x, handle=handle, **kw))
        t_c = b2b(lambda: buf.combine(y, handle, **kw))
        name = ", ".join(f"{k}={v}" for k, v in fields.items()) or "defaults"
        rows.append(f"{name:<50} cached dispatch {t_d:7.0f} us  combine {t_c:7.0f} us  same={same}")
        buf.destroy()
    if rank == 0:
        print(f"{dist.get_world_size()} ranks, {n} tokens/rank, {args.num_sms} SMs, FP8 dispatch / BF16 combine; "
              f"us per call of {args.iters} calls queued back to back")
        print("\n".join(rows))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
