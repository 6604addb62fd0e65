"""Faults on GPUs: a rank killed (SIGKILL) after building its buffers. The survivors' dispatch
without host sync returns (its kernels wait on the GPU), and once those kernels have timed out the
buffer's next call raises CommTimeoutError naming the dead rank, from the status the kernel copied
to host memory (no sync: the same operation number as the kernel recorded); a synced dispatch on a
second buffer raises too, and V1's low-latency dispatch at its next call; the survivors destroy
their buffers without a barrier with the dead rank, and hold no more memory in torch's CUDA
allocator than before they built them, nor any heap of their own (ranks sharing a GPU allocate
the heaps with cudaMalloc and free them at destroy, whoever had opened them).

Environment: as tests/gpu/test_ep_gpu.py (``TRITONEP_TEST_SHARED_GPU=1``: ranks share GPU 0)."""
import os

import pytest

from tritonep.testing.launch import parallel_launch

pytestmark = pytest.mark.gpu
LAUNCH = "shared-gpu" if os.environ.get("TRITONEP_TEST_SHARED_GPU", "0") == "1" else "nccl"
TIMEOUT_S = 5


def _worker(info):
    os.environ["TRITONEP_GPU_TIMEOUT_SECS"] = str(TIMEOUT_S)  # (V1's Buffer takes it from here)
    import gc
    import signal

    import torch
    import torch.distributed as dist

    from tritonep import Buffer, CommTimeoutError, ElasticBuffer
    from tritonep.heap.ipc import live_bytes

    R, r, dev = info.world_size, info.rank, info.device
    dead = R - 1
    T, H, E = 64, 512, 2 * R
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(dev)
    kw = dict(num_max_tokens_per_rank=T, hidden=H, num_topk=2, num_gpu_timeout_secs=TIMEOUT_S, explicitly_destroy=True)
    ep, synced = ElasticBuffer(info.group, **kw), ElasticBuffer(info.group, **kw)
    ll = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                explicitly_destroy=True)
    dist.barrier(group=info.group)
    torch.cuda.synchronize()
    if r == dead:
        os.kill(os.getpid(), signal.SIGKILL)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).to(dev)
    topk = torch.rand(T, E, generator=g).topk(2, dim=1).indices.to(dev)
    out = {}
    try:  # queued; its kernels wait for the dead rank on the GPU until they time out
        ep.dispatch(x, topk_idx=topk, num_experts=E, do_cpu_sync=False)
        out["no-sync dispatch"] = None
    except CommTimeoutError as e:
        out["no-sync dispatch"] = str(e)
    torch.cuda.synchronize()  # (the timed-out kernels have ended: their status reached host memory)
    out["recorded on the host"] = ep._backend.status_words.failed()
    for name, fn in {"next call": lambda: ep.dispatch(x, topk_idx=topk, num_experts=E, do_cpu_sync=False),
                     "synced dispatch": lambda: synced.dispatch(x, topk_idx=topk, num_experts=E),
                     "low-latency dispatch": lambda: ll.low_latency_dispatch(x, topk, T, E, use_fp8=False)}.items():
        try:
            fn()
            if name == "low-latency dispatch":  # (queued: its kernel times out on the device first)
                torch.cuda.synchronize()
                fn()
            out[name] = None
        except CommTimeoutError as e:
            out[name] = str(e)
    for buf in (ep, synced, ll):
        buf.destroy()
    # (the loop variable too: a destroyed buffer's object keeps its few bookkeeping tensors)
    ep = synced = ll = x = topk = buf = fn = None
    gc.collect()
    torch.cuda.synchronize()
    out["memory held"] = torch.cuda.memory_allocated(dev) - before
    if out["memory held"]:  # what still holds it
        out["live CUDA tensors"] = sorted({(tuple(t.shape), str(t.dtype)) for t in gc.get_objects()
                                           if isinstance(t, torch.Tensor) and t.is_cuda})[:20]
    # ranks sharing one GPU: the heaps are cudaMalloc'd outside torch's allocator (tritonep.heap.ipc)
    out["ipc heap bytes held"] = live_bytes()
    return out


def test_a_killed_rank_is_reported_at_the_next_call():
    R = int(os.environ.get("TRITONEP_TEST_RANKS", "2"))
    out = parallel_launch(R, _worker, backend=LAUNCH, allow_failures=True, timeout=300)
    assert out[R - 1][0] == "error" and "died" in out[R - 1][1]
    for rank in range(R - 1):
        got = out[rank]
        assert got["no-sync dispatch"] is None, got  # (no host wait: nothing to raise yet)
        assert got["recorded on the host"] is True, got
        for name in ("next call", "synced dispatch", "low-latency dispatch"):
            msg = got[name]
            assert msg is not None and f"rank {rank} timed out" in msg and f"waiting for rank {R - 1}" in msg, (name, msg)
        assert got["ipc heap bytes held"] == 0, got
        assert got["memory held"] == 0, (got["memory held"], got.get("live CUDA tensors"))
