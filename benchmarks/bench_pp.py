"""Pipeline-parallel send/recv (``pp_send`` / ``pp_recv``): throughput, latency, and proof of 0 SMs.

Run: torchrun --nproc_per_node=N benchmarks/bench_pp.py [--sizes-mb 1 4 16 64 256] [--out rows.json]
     python benchmarks/bench_pp.py [...]    (one process: every message goes to this rank itself)

Per message size: ``--iters`` rounds of (``pp_send`` to the next rank, ``pp_recv`` from the
previous one) queued back to back, CUDA events around them, a barrier before; the mean per message,
and GB/s = message bytes / that time. Peers timed in the same run on the same bytes:

* ``copy``: one ``cudaMemcpyAsync`` of the message into the next rank's heap (the data movement
  of a send alone, no flag, no receive copy);
* ``nccl`` (more than one rank): ``torch.distributed.batch_isend_irecv`` of the same tensors.

A message is copied twice: into the receiver's slot (by the sender's copy engine) and out of it into
the receive tensor (by the receiver's). With one process both copies run on one GPU, one after the
other, so a message costs about two ``copy`` times there; on two GPUs the ring's copies overlap.

``--profile``: the GPU activity of a few exchanges (torch.profiler): every kernel is listed; the
copies appear as memcpy, the flags as stream memory operations (no kernel).
``--gemm``: a bf16 GEMM on another stream, alone and while the largest messages go round: the
fraction of its speed it keeps.
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from bench_ep import finish, init_ranks, single_process_defaults, time_warm


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--gemm", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    single_process_defaults(29563)
    rank, dev = init_ranks()
    if dev.type != "cuda":
        raise SystemExit("needs one GPU per rank")
    from tritonep import ElasticBuffer
    from tritonep.copy_engine import copy_bytes

    R = dist.get_world_size()
    prev, nxt = (rank - 1) % R, (rank + 1) % R
    sizes = [int(mb * (1 << 20)) // 32 * 32 for mb in args.sizes_mb]
    biggest = max(sizes + [64 << 10])
    buf = ElasticBuffer(dist.group.WORLD, num_bytes=ElasticBuffer.get_pp_buffer_size_hint(biggest, args.inflight),
                        explicitly_destroy=True)
    buf.pp_set_config(biggest, args.inflight)
    heap = buf._backend.heap
    name = torch.cuda.get_device_name(dev)
    rows = []

    def exchange(t, out):
        def fn():
            buf.pp_send(t, nxt)
            buf.pp_recv(out, prev)
        return fn

    for nbytes in sizes + [64 << 10]:
        t = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
        out = torch.empty_like(t)
        host = []
        t_pp = time_warm(exchange(t, out), args.iters, host)
        assert torch.equal(out, t) or R > 1
        stream = torch.cuda.current_stream().cuda_stream
        t_copy = time_warm(lambda: copy_bytes(heap.data_addrs[nxt], t.data_ptr(), nbytes, stream), args.iters)
        t_nccl = float("nan")
        if R > 1:
            def nccl():
                ops = [dist.P2POp(dist.isend, t, nxt), dist.P2POp(dist.irecv, out, prev)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            t_nccl = time_warm(nccl, args.iters)
        rows.append(dict(bytes=nbytes, ranks=R, device=name, pp_us=t_pp, host_us=host[0], copy_us=t_copy,
                         nccl_us=t_nccl))
    if rank == 0:
        print(f"{R} rank(s), {name}; {args.inflight} slots, mean of {args.iters} messages"
              + ("; one process: the messages go to this rank itself" if R == 1 else ""))
        print(f"{'MB':>8} {'pp us':>9} {'GB/s':>7} {'host us':>8} {'copy us':>9} {'GB/s':>7} {'nccl us':>9} "
              f"{'GB/s':>7}")
        for r in rows:
            mb, gb = r["bytes"] / 2**20, r["bytes"] / 1e3
            print(f"{mb:>8.3f} {r['pp_us']:>9.1f} {gb / r['pp_us']:>7.1f} {r['host_us']:>8.1f} {r['copy_us']:>9.1f} "
                  f"{gb / r['copy_us']:>7.1f} {r['nccl_us']:>9.1f} {gb / r['nccl_us']:>7.1f}")
    if args.profile:
        t = torch.randint(0, 255, (sizes[0],), dtype=torch.uint8, device=dev)
        out = torch.empty_like(t)
        fn = exchange(t, out)
        fn()
        torch.cuda.synchronize()
        from tritonep.testing.gpu_trace import gpu_activities, kernels_of

        def four():
            for _ in range(4):
                fn()
        names = gpu_activities(four)
        kernels = kernels_of(names)
        if rank == 0:
            print(f"profile of 4 exchanges of {sizes[0]} bytes: GPU activities {names}")
            print(f"kernels: {kernels if kernels else 'none'}")
        rows.append(dict(profile=names, kernels=kernels))
    if args.gemm:
        a = torch.randn(8192, 8192, device=dev).to(torch.bfloat16)
        side = torch.cuda.Stream()
        gemm_iters = 20
        alone = time_warm(lambda: a @ a, gemm_iters)
        t = torch.randint(0, 255, (biggest,), dtype=torch.uint8, device=dev)
        out = torch.empty_like(t)
        fn = exchange(t, out)
        torch.cuda.synchronize()
        dist.barrier()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(4 * args.iters):  # queued first: the GEMMs below run while these copy
                fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(gemm_iters):
            a @ a
        end.record()
        end.synchronize()
        beside = start.elapsed_time(end) * 1e3 / gemm_iters
        torch.cuda.synchronize()
        if rank == 0:
            print(f"GEMM 8192^3 bf16: {alone:.0f} us alone, {beside:.0f} us beside {biggest >> 20} MB messages "
                  f"({alone / beside:.1%} of its speed kept)")
        rows.append(dict(gemm_alone_us=alone, gemm_beside_us=beside))
    finish(rank, rows, args.out, buf)


if __name__ == "__main__":
    main()
