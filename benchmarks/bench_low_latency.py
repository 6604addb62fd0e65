"""V1's low-latency dispatch and combine at decode sizes, in CUDA graphs.

Run: torchrun --nproc_per_node=N benchmarks/bench_low_latency.py [--tokens 1 32 64 128] [--out rows.json]
     python benchmarks/bench_low_latency.py    (one process: every expert on this GPU)

Per token count (tokens per rank; the buffer is sized for the largest): each operation captured in
its own CUDA graph and replayed ``--replays`` times back to back; the mean per replay (CUDA events
around the loop, a barrier before it). ``dispatch`` and ``combine`` are whole operations;
``send`` and ``recv`` are the halves split by ``return_recv_hook`` (send alone replayed, then send +
receive: the receive is the difference). FP8 dispatch (``--bf16`` for BF16), BF16 combine, top-8
of 256 experts, hidden 7168. One process measures the kernels' own time with no NVLink traffic
(every row stays on the GPU); ranks sharing one GPU would measure the GPU's time slicing between
processes, so the script refuses them.
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from bench_ep import _time_back_to_back, finish, init_ranks, single_process_defaults


def _graph(fn, warm: bool = True):
    if warm:
        fn()  # compiles, and leaves the buffers in step
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 64, 128])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="BF16 dispatch (default FP8)")
    p.add_argument("--replays", type=int, default=1000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    single_process_defaults(29561)
    rank, dev = init_ranks()
    if dev.type != "cuda":
        raise SystemExit("needs one GPU per rank")
    from tritonep import Buffer
    from tritonep.testing.gate import make_inputs

    R, H, E, K = dist.get_world_size(), args.hidden, args.experts, args.topk
    T, fp8, L = max(args.tokens), not args.bf16, args.experts // dist.get_world_size()
    buf = Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                 num_qps_per_rank=L, explicitly_destroy=True)
    name = torch.cuda.get_device_name(dev)
    if rank == 0:
        print(f"{R} rank(s), {name}; T={T}, hidden {H}, top-{K} of {E}, {'FP8' if fp8 else 'BF16'} dispatch, "
              f"{args.replays} replays per graph" + ("; one process: no NVLink traffic" if R == 1 else ""))
        print(f"{'tokens':>6} {'dispatch':>9} {'send':>7} {'recv':>7} {'combine':>8} {'send':>7} {'recv':>7}  (us)")
    rows = []
    for n in args.tokens:
        x, topk, w = (t.to(dev) for t in make_inputs(3, rank, n, H, E, K))

        def dispatch(hook: bool = False):
            return buf.low_latency_dispatch(x, topk, T, E, use_fp8=fp8, return_recv_hook=hook)

        handle = dispatch()[2]
        y = torch.randn((L, R * T, H), device=dev).to(torch.bfloat16)

        def combine(hook: bool = False):
            return buf.low_latency_combine(y, topk, w, handle, return_recv_hook=hook)

        times = {}
        for op, fn in (("dispatch", dispatch), ("combine", combine)):
            whole, _ = _graph(fn)
            times[op] = _time_back_to_back(whole.replay, args.replays, True)
            # (compiled by now; a send warmed up without its receive would leave the ranks out of step)
            send, out = _graph(lambda: fn(True), warm=False)
            recv, _ = _graph(out[-1], warm=False)  # the hook of the captured send
            t_send = _time_back_to_back(send.replay, args.replays, True)
            recv.replay()  # the sends above left one operation to receive
            t_both = _time_back_to_back(lambda: (send.replay(), recv.replay()), args.replays, True)
            times[op + "_send"], times[op + "_recv"] = t_send, t_both - t_send
        rows.append(dict(tokens=n, ranks=R, device=name, fp8=fp8, **times))
        if rank == 0:
            print(f"{n:>6} {times['dispatch']:>9.1f} {times['dispatch_send']:>7.1f} {times['dispatch_recv']:>7.1f} "
                  f"{times['combine']:>8.1f} {times['combine_send']:>7.1f} {times['combine_recv']:>7.1f}")
    finish(rank, rows, args.out, buf)


if __name__ == "__main__":
    main()
