"""Sweep the tile shapes of the row kernels (tokens per tile, words per tile row, warps) on GPUs.

Run: torchrun --nproc_per_node=2 benchmarks/tune_tiles.py [--tokens 8192] [--num-sms 24] [--shares 0.5 0.75]

For each configuration: the time per call of cached FP8 dispatches and of BF16 combines queued back
to back (``bench_ep.py``'s ``[b2b]`` columns: GPU-bound, so steadier than one call's median for
comparing kernels), and a bitwise check that the outputs equal those of the first configuration
(tile shapes must never change results). The module constants it patches are the defaults in
``tritonep/kernels/dispatch_rows.py`` (push tiles, then the epilogue's) and ``combine_rows.py``;
copy the winner there. ``--shares`` also sweeps ``SENDER_SHARE`` (the share of a pipelined
launch's programs that push) of the pipelined combine and of the pipelined dispatch.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from bench_ep import _time_back_to_back, init_ranks

# 4 and 8 warps only: the push holds ~200 registers per thread, so 16 warps would not fit an SM
DISPATCH = [  # (tokens per tile, words per tile row, warps)
    (16, 512, 8), (8, 512, 8), (32, 256, 8), (16, 1024, 8), (16, 512, 4), (32, 512, 8), (8, 1024, 4),
]
EPILOGUE = [  # (tokens per tile, words per tile row, warps): bytes in flight per SM
    (16, 512, 8), (32, 512, 8), (16, 1024, 8), (32, 1024, 8), (32, 1024, 16), (64, 512, 16), (8, 2048, 8),
]
COMBINE = [  # (rows per push tile, words per push tile row, warps, tokens per reduce tile, reduce channels)
    (16, 512, 8, 8, 1024), (8, 512, 8, 8, 1024), (32, 512, 8, 8, 1024), (16, 1024, 8, 8, 1024),
    (16, 512, 4, 8, 1024), (16, 512, 8, 4, 2048), (16, 512, 8, 16, 512), (32, 256, 8, 16, 1024),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--shares", type=float, nargs="*", default=[0.5, 0.625, 0.75])
    args = p.parse_args()
    rank, device = init_ranks()
    if device.type != "cuda":
        raise SystemExit("this tool measures GPUs: run it with torchrun on a machine with one GPU per rank")
    from tritonep import ElasticBuffer
    from tritonep.kernels import combine_rows, dispatch_rows
    from tritonep.testing.gate import make_topk

    n, H, E, K = args.tokens, 7168, 256, 8
    buf = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=n, hidden=H, num_topk=K, backend="symmetric",
                        explicitly_destroy=True, num_gpu_timeout_secs=20)
    topk = make_topk(7, rank, n, E, K).to(device)
    w = torch.rand(n, K, device=device)
    x = (torch.randn(n, H, device=device).clamp(-448, 448).to(torch.float8_e4m3fn),
         torch.rand(n, H // 128, device=device))
    kw = dict(num_sms=args.num_sms)
    rows, ref = [], {}

    def b2b(fn):
        for _ in range(args.warmup):
            fn()
        return _time_back_to_back(fn, args.iters, True)

    def check_dispatch(i):
        out = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, **kw)
        if i == 0 and "d" not in ref:
            ref["d"], ref["handle"] = out[0][0].view(torch.uint8).clone(), out[3]
            return "ref"
        cached = buf.dispatch(x, handle=ref["handle"], **kw)[0][0].view(torch.uint8)
        return str(bool(torch.equal(out[0][0].view(torch.uint8), ref["d"]) and torch.equal(cached, ref["d"])))

    for i, (bt, bw, nw) in enumerate(DISPATCH):
        dispatch_rows.BLOCK_TOKENS, dispatch_rows.BLOCK_WORDS, dispatch_rows.NUM_WARPS = bt, bw, nw
        same = check_dispatch(i)
        tc = b2b(lambda: buf.dispatch(x, handle=ref["handle"], **kw))
        rows.append(f"dispatch push BT={bt:<3} BW={bw:<5} warps={nw:<3} cached {tc:6.0f} us  same={same}")
    dispatch_rows.BLOCK_TOKENS, dispatch_rows.BLOCK_WORDS, dispatch_rows.NUM_WARPS = DISPATCH[0]
    for i, (bt, bw, nw) in enumerate(EPILOGUE):
        dispatch_rows.EPILOGUE_TOKENS, dispatch_rows.EPILOGUE_WORDS, dispatch_rows.EPILOGUE_WARPS = bt, bw, nw
        same = check_dispatch(1)
        tc = b2b(lambda: buf.dispatch(x, handle=ref["handle"], **kw))
        rows.append(f"dispatch epilogue BT={bt:<3} BW={bw:<5} warps={nw:<3} cached {tc:6.0f} us  same={same}")
    dispatch_rows.EPILOGUE_TOKENS, dispatch_rows.EPILOGUE_WORDS, dispatch_rows.EPILOGUE_WARPS = EPILOGUE[0]
    handle = ref["handle"]
    y = torch.randn(handle.num_recv_tokens, H, device=device).to(torch.bfloat16)
    for i, (br, bw, nw, rt, rc) in enumerate(COMBINE):
        combine_rows.BLOCK_ROWS, combine_rows.BLOCK_WORDS, combine_rows.NUM_WARPS = br, bw, nw
        combine_rows.REDUCE_TOKENS = rt
        combine_rows.reduce_channels = lambda R, k, rc=rc: rc
        out = buf.combine(y, handle, **kw)[0]
        same = "ref" if i == 0 else str(bool(torch.equal(out, ref["c"])))
        if i == 0:
            ref["c"] = out.clone()
        t = b2b(lambda: buf.combine(y, handle, **kw))
        rows.append(f"combine  BR={br:<3} BW={bw:<5} warps={nw:<3} reduce {rt}x{rc:<5} {t:8.0f} us  same={same}")
    br, bw, nw, rt, rc = COMBINE[-1]  # the defaults
    combine_rows.BLOCK_ROWS, combine_rows.BLOCK_WORDS, combine_rows.NUM_WARPS = br, bw, nw
    combine_rows.REDUCE_TOKENS = rt
    combine_rows.reduce_channels = lambda R, k, rc=rc: rc
    piped = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=n, hidden=H, num_topk=K, backend="symmetric",
                          explicitly_destroy=True, num_gpu_timeout_secs=20, pipelined_dispatch=True)
    for share in args.shares:
        combine_rows.SENDER_SHARE = dispatch_rows.SENDER_SHARE = share
        t_c = b2b(lambda: buf.combine(y, handle, **kw))
        same = str(bool(torch.equal(buf.combine(y, handle, **kw)[0], ref["c"])))
        out = piped.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, **kw)
        same += "/" + str(bool(torch.equal(out[0][0].view(torch.uint8), ref["d"])))
        t_d = b2b(lambda: piped.dispatch(x, handle=out[3], **kw))
        rows.append(f"senders {share:.3f}: pipelined combine {t_c:8.0f} us, pipelined cached dispatch {t_d:8.0f} us  "
                    f"same={same}")
    piped.destroy()
    if rank == 0:
        print(f"{dist.get_world_size()} ranks, {n} tokens/rank, {args.num_sms} SMs, FP8 dispatch / BF16 combine; "
              f"us per call of {args.iters} calls queued back to back")
        print("\n".join(rows))
    buf.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
