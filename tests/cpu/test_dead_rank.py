"""A rank killed (SIGKILL) after building its buffers: every other rank's next dispatch,
low-latency dispatch, pipeline receive and all-gather raises CommTimeoutError naming the dead rank
and the operation, instead of hanging; the buffer's next call raises the same error at once, from
the status words the kernel copied to host memory (no new wait: the same operation number); the
survivors then destroy their buffers without waiting for it again; nothing is left in /dev/shm,
and nothing of tritonep keeps a destroyed buffer alive once the caller lets go of it."""
import os

from tritonep.testing.launch import parallel_launch

TIMEOUT_S = 5


def _worker(info):
    os.environ["TRITONEP_GPU_TIMEOUT_SECS"] = str(TIMEOUT_S)  # (V1's Buffer takes it from here)
    import signal
    import time

    import torch
    import torch.distributed as dist

    from tritonep import Buffer, CommTimeoutError, ElasticBuffer

    R, r = info.world_size, info.rank
    dead = R - 1
    T, H, E = 8, 512, 2 * R
    ep = ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=128, num_topk=2,
                       num_gpu_timeout_secs=TIMEOUT_S)
    pp = ElasticBuffer(info.group, num_bytes=2 << 20, num_gpu_timeout_secs=TIMEOUT_S)
    pp.pp_set_config(1024, 2)
    ag = ElasticBuffer(info.group, num_bytes=2 << 20, num_gpu_timeout_secs=TIMEOUT_S)
    ag.agrs_set_config(4096, 2)
    ll = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                explicitly_destroy=True)
    dist.barrier(group=info.group)
    if r == dead:
        os.kill(os.getpid(), signal.SIGKILL)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(T, 128, generator=g).to(torch.bfloat16)
    topk = torch.rand(T, E, generator=g).topk(2, dim=1).indices
    llx = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ag.create_agrs_session()
    ops = {"dispatch": lambda: ep.dispatch(x, topk_idx=topk, num_experts=E),
           "low-latency dispatch": lambda: ll.low_latency_dispatch(llx, topk, T, E, use_fp8=False),
           "pp_recv": lambda: pp.pp_recv(torch.zeros(8), dead),
           "all_gather": lambda: ag.all_gather(torch.zeros(8))}
    out = {}
    for name, fn in ops.items():
        t0 = time.monotonic()
        try:
            fn()
            out[name] = (None, 0.0)
        except CommTimeoutError as e:
            out[name] = (str(e), time.monotonic() - t0)
    # the next call of a buffer whose kernel timed out: the recorded error, not a new wait
    for name in ("dispatch", "low-latency dispatch"):
        try:
            ops[name]()
            out[name + ", next call"] = (None, 0.0)
        except CommTimeoutError as e:
            out[name + ", next call"] = (str(e), 0.0)
    out["recorded on the host"] = (ep._backend.status_words.failed(), 0.0)
    # each survivor releases its buffers without a barrier with the dead rank (no second timeout)
    for buf in (ep, pp, ag, ll):
        buf.destroy()
    # and once the caller lets go of them, nothing of tritonep keeps them (or their memory) alive
    import gc
    import weakref

    refs = [weakref.ref(b) for b in (ep, pp, ag, ll)]
    ep = pp = ag = ll = buf = ops = fn = None
    gc.collect()
    out["alive after destroy"] = ([type(r()).__name__ for r in refs if r() is not None], 0.0)
    return out


def test_a_killed_rank_is_named_by_every_other_rank():
    before = {n for n in os.listdir("/dev/shm") if n.startswith("tritonep_")}
    out = parallel_launch(3, _worker, allow_failures=True)
    assert out[2][0] == "error" and "died" in out[2][1]
    for rank in (0, 1):
        assert out[rank].pop("recorded on the host")[0] is True
        assert out[rank].pop("alive after destroy")[0] == [], out[rank]
        for name in ("dispatch", "low-latency dispatch"):
            assert out[rank].pop(name + ", next call")[0] == out[rank][name][0], out[rank]
        for name, (msg, elapsed) in out[rank].items():
            assert msg is not None, f"rank {rank}: {name} did not raise"
            assert f"rank {rank} timed out" in msg and "waiting for rank 2" in msg, msg
            key = {"pp_recv": "pp_recv", "all_gather": "all_gather"}.get(name, name)
            assert key in msg, msg
            assert elapsed < 20 * TIMEOUT_S, (name, elapsed)  # (a loaded machine: no tight bound)
    after = {n for n in os.listdir("/dev/shm") if n.startswith("tritonep_")}
    assert after <= before, f"left in /dev/shm: {sorted(after - before)}"
