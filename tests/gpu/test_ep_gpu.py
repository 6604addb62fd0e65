"""The CPU suite's checks on GPUs at DeepSeek-V3 sizes (4096 tokens/rank, hidden 7168, top-8 of 256
experts), bit-exact against the reference. Every case runs twice: an error that moves is a race.

Environment (besides ``TRITONEP_*`` settings): ``TRITONEP_TEST_RANKS`` (2), ``TRITONEP_TEST_SHARED_GPU``
(ranks share GPU 0), ``TRITONEP_TEST_TOKENS`` (tokens per rank, 4096: fewer for many ranks on one
GPU), ``TRITONEP_TEST_CONFIG`` (``name=value,...``: :class:`tritonep.KernelConfig` fields every buffer of
the tests takes, e.g. ``copy_engine_chunk_rows=512,dispatch_push_tile=(16, 512, 8)``)."""
import os

import pytest
import torch

import dataclasses

from tritonep import KernelConfig, ElasticBuffer
from tritonep.config import parse_settings
from tritonep.testing.ep_check import Case, run_case
from tritonep.testing.launch import parallel_launch

pytestmark = pytest.mark.gpu
T, H, E, K = int(os.environ.get("TRITONEP_TEST_TOKENS", "4096")), 7168, 256, 8
NUM_RANKS = int(os.environ.get("TRITONEP_TEST_RANKS", "2"))
#: ranks on GPUs of their own, or sharing GPU 0 (TRITONEP_TEST_SHARED_GPU=1: see tests/conftest.py)
LAUNCH = "shared-gpu" if os.environ.get("TRITONEP_TEST_SHARED_GPU", "0") == "1" else "nccl"


def _config(**fields) -> KernelConfig:
    """``fields``, then ``TRITONEP_TEST_CONFIG`` on top."""
    return dataclasses.replace(KernelConfig(**fields), **parse_settings(os.environ.get("TRITONEP_TEST_CONFIG", "")))


def _cases(R):
    return [
        Case(seed=1, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, num_bias=2),
        Case(seed=2, num_tokens=[T - 7 * r for r in range(R)], hidden=H, num_experts=E, num_topk=K,
             routing="skewed", masked_ratio=0.1, num_bias=1, fp8=True, expert_alignment=128),
        Case(seed=3, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, routing="one_expert",
             with_weights=False),
        Case(seed=4, num_tokens=[0] + [T] * (R - 1), hidden=H, num_experts=E, num_topk=K, masked_ratio=0.5),
        Case(seed=5, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, cpu_sync=False, async_mode=True,
             previous_event=True, event_before_epilogue=True, num_bias=1),
        Case(seed=6, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, expand=True, expert_alignment=128,
             zero_padding=True, fp8=True, sf_col_major=True, num_bias=2),
        Case(seed=7, num_tokens=[T - 3] * R, hidden=H, num_experts=E, num_topk=K, expand=True, cpu_sync=False,
             async_mode=True, masked_ratio=0.2),
        Case(seed=8, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, quantize=True, num_bias=1),
        Case(seed=9, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, quantize=True, round_scale=True,
             expand=True, expert_alignment=128),
        # outputs of exactly the most rows any rank receives (num_max_recv_tokens)
        Case(seed=10, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, cpu_sync=False, tight_capacity=True,
             routing="skewed", num_bias=1),
        Case(seed=11, num_tokens=[T - 5] * R, hidden=H, num_experts=E, num_topk=K, expand=True, expert_alignment=128,
             cpu_sync=False, tight_capacity=True, fp8=True),
    ]


def _poison_allocator(device):
    # fresh outputs come from this poisoned memory, so an unwritten row cannot pass as zeros
    junk = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    junk.fill_(0xFF)
    del junk


def _worker(info, backend, num_sms):
    # the defaults, then SMs moving every row (at 2 ranks: the pipelined combine into combine slots)
    bufs = [ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=H, num_topk=K, backend=backend,
                          allow_multiple_reduction=amr, num_gpu_timeout_secs=30, explicitly_destroy=True,
                          config=_config(**fields))
            for amr, fields in ((True, {}), (False, dict(copy_engine_min_bytes=-1)))]
    fp8_buf = ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=H, num_topk=K, backend=backend,
                            use_fp8_dispatch=True, num_gpu_timeout_secs=30, explicitly_destroy=True, config=_config())
    if backend == "symmetric":
        for buf in bufs:
            buf._backend.heap.data.fill_(0xFF)
        torch.cuda.synchronize()
        bufs[0].barrier(with_cpu_sync=True)
    out = []
    reps = 2 if backend == "symmetric" else 1  # an error that moves between repeats is a race
    for case in _cases(info.world_size):
        if case.quantize:
            runs = [fp8_buf] * reps
        elif case.expand:  # both reduction levels, each repeated
            runs = [buf for buf in bufs for _ in range(reps)]
        else:  # the default paths, then the other dispatch and combine paths
            runs = bufs[:reps]
        for buf in runs:
            _poison_allocator(info.device)
            out.append(run_case(buf, case, num_sms=num_sms))
    for buf in bufs + [fp8_buf]:
        buf.destroy()
    return out


@pytest.mark.parametrize("num_sms", [24, 132])
def test_symmetric_deepseek_sizes(num_sms):
    out = parallel_launch(NUM_RANKS, _worker, "symmetric", num_sms, backend=LAUNCH)
    print(f"\nsymmetric, {NUM_RANKS} ranks, {num_sms} SMs: "
          + ", ".join(str(r["num_recv_tokens"]) for r in out[0]) + " rows received")


@pytest.mark.skipif(LAUNCH == "shared-gpu", reason="the all-to-all backend needs NCCL (one GPU per rank)")
def test_alltoall_deepseek_sizes():
    parallel_launch(NUM_RANKS, _worker, "alltoall", 0, backend=LAUNCH)


def _capacity_worker(info):
    from tritonep.testing.capacity_check import run_graph_overflow_check, run_overflow_check

    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=512, hidden=H, num_topk=2, num_gpu_timeout_secs=30,
                        explicitly_destroy=True, config=_config())
    out = {f"eager expand={e}": run_overflow_check(buf, 512, H, e) for e in (False, True)}
    out["graph"] = run_graph_overflow_check(buf, 512, H)
    buf.destroy()
    return out


@pytest.mark.skipif(NUM_RANKS < 2, reason="one rank cannot overflow another")
def test_capacity_overflow():
    """A dispatch whose outputs are one row short raises RecvOverflowError on every rank, eagerly and
    (as the device flag) from a CUDA graph replay; clear_overflow() makes the buffer work again."""
    out = parallel_launch(NUM_RANKS, _capacity_worker, backend=LAUNCH)
    print(f"\ncapacity, {NUM_RANKS} ranks: {out[0]}")


def _graph_worker(info, num_sms):
    from tritonep.testing.graph_check import run_graph_checks

    # copy_engine_min_bytes=0: the cached graph's rows leave the receive slots by the copy engine
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=1024, hidden=H, num_topk=K, num_gpu_timeout_secs=30,
                        explicitly_destroy=True, config=_config(copy_engine_min_bytes=0))
    out = run_graph_checks(buf, num_tokens=1024, hidden=H, num_experts=E, num_topk=K, num_sms=num_sms)
    buf.destroy()
    return out


def test_cuda_graph_replay():
    """Cached and fresh (no CPU sync) dispatch + combine captured in CUDA graphs and replayed with new
    inputs: bit-exact every replay, and eager calls in between stay in step."""
    out = parallel_launch(NUM_RANKS, _graph_worker, 24, backend=LAUNCH)
    print(f"\ngraphs, {NUM_RANKS} ranks: {out[0]['replays']} replays checked")


def _replay_worker(info):
    from tritonep.testing.replay_check import run_replay_checks

    kw = dict(num_max_tokens_per_rank=256, hidden=H, num_topk=K, num_gpu_timeout_secs=30, explicitly_destroy=True,
              config=_config())
    buf, fp8_buf = ElasticBuffer(info.group, **kw), ElasticBuffer(info.group, use_fp8_dispatch=True, **kw)
    out = run_replay_checks(buf, fp8_buf, num_tokens=200, hidden=H, num_experts=E, num_topk=K)
    buf.destroy()
    fp8_buf.destroy()
    return out


def test_cached_calls_replay():
    """Eager cached dispatches and combines that replay their handle's recorded launches equal the
    full path bit for bit (fresh inputs each call; caller's stream, another stream, asynchronous)."""
    out = parallel_launch(NUM_RANKS, _replay_worker, backend=LAUNCH)
    print(f"\nreplay, {NUM_RANKS} ranks: {out[0]['calls']} calls compared, plans per handle {out[0]['plans']}")


def _capture_refusal_worker(info):
    from tritonep.testing.graph_check import check_capture_refusals

    sym = ElasticBuffer(info.group, num_max_tokens_per_rank=256, hidden=H, num_topk=K, explicitly_destroy=True)
    a2a = ElasticBuffer(info.group, num_max_tokens_per_rank=256, hidden=H, num_topk=K, backend="alltoall",
                        explicitly_destroy=True)
    check_capture_refusals(sym, a2a, num_tokens=256, hidden=H, num_experts=E, num_topk=K)
    sym.destroy()
    a2a.destroy()


def test_capture_refuses_host_sync():
    """Inside a capture, a synced dispatch and the all-to-all backend raise ValueError before any
    kernel, and both buffers keep working."""
    parallel_launch(NUM_RANKS, _capture_refusal_worker, backend=LAUNCH)


def _hosts_worker(info, hybrid):
    os.environ["TRITONEP_SCALEUP_SIZE"] = "2"  # two hosts of two ranks (declared: one machine)
    R, T2 = info.world_size, 1024
    bufs = [ElasticBuffer(info.group, num_max_tokens_per_rank=T2, hidden=H, num_topk=K, allow_multiple_reduction=amr,
                          allow_hybrid_mode=hybrid, num_gpu_timeout_secs=30, explicitly_destroy=True)
            for amr in (True, False)]
    logical = (R // 2, 2) if hybrid else (1, R)
    assert all(b.backend == ("hybrid" if hybrid else "direct") and b.get_logical_domain_size() == logical
               for b in bufs)
    cases = [Case(seed=31, num_tokens=[T2] * R, hidden=H, num_experts=E, num_topk=K, num_bias=2),
             Case(seed=32, num_tokens=[T2 - 5 * r for r in range(R)], hidden=H, num_experts=E, num_topk=K, fp8=True,
                  routing="skewed", masked_ratio=0.1, cpu_sync=False, num_bias=1),
             Case(seed=33, num_tokens=[T2] * R, hidden=H, num_experts=E, num_topk=K, quantize=False,
                  async_mode=True, previous_event=True),
             Case(seed=34, num_tokens=[T2 // 2] * R, hidden=H, num_experts=E, num_topk=K, expand=True,
                  expert_alignment=64, num_bias=1)]
    out = [run_case(buf, case) for case in cases for buf in bufs]
    for buf in bufs:
        buf.destroy()
    return out


@pytest.mark.skipif(NUM_RANKS < 4 and LAUNCH == "nccl", reason="two hosts of two ranks need 4 GPUs (or shared GPU)")
@pytest.mark.parametrize("mode", ["hybrid", "direct"])
def test_two_hosts(mode):
    """Hybrid and direct mode across two declared hosts of two ranks (inside a host: the heap),
    bit-exact against the reference."""
    parallel_launch(4, _hosts_worker, mode == "hybrid", backend=LAUNCH)


def _legacy_worker(info, hosts=1):
    if hosts > 1:
        os.environ["TRITONEP_SCALEUP_SIZE"] = str(info.world_size // hosts)  # declared hosts: one machine
    from tritonep import Buffer, Config
    from tritonep.testing.legacy_check import LegacyCase, run_legacy_case

    R, n = info.world_size, min(T, 1024)
    _poison_allocator(torch.device("cuda", torch.cuda.current_device()))
    # sized as V1 programs size it: the hint of their config
    buf = Buffer(info.group, num_nvl_bytes=Config(24, 8, 256).get_nvl_buffer_size_hint(H * 2, R),
                 explicitly_destroy=True)
    cases = [LegacyCase(41, [n] * R, H, E, K, num_bias=2, worst=True),
             LegacyCase(42, [n - 5 * r for r in range(R)], H, E, K, "skewed", 0.1, fp8=True, worst=True,
                        async_mode=True, previous_event=True),
             LegacyCase(43, [n] * R, H, E, K, with_topk=False, num_bias=1)]
    out = [run_legacy_case(buf, case) for case in cases for _ in range(2)]
    buf.destroy()
    return out


def test_legacy_buffer():
    """V1's Buffer (normal mode) at DeepSeek-V3 sizes, bit-exact against the reference."""
    parallel_launch(NUM_RANKS, _legacy_worker, backend=LAUNCH)


@pytest.mark.skipif(NUM_RANKS < 4 and LAUNCH == "nccl", reason="two hosts of two ranks need 4 GPUs (or shared GPU)")
def test_legacy_buffer_two_hosts():
    """V1's Buffer in internode mode: two declared hosts of two ranks, bit-exact against the reference."""
    parallel_launch(4, _legacy_worker, 2, backend=LAUNCH)


def _ll_worker(info):
    from tritonep import Buffer
    from tritonep.testing.low_latency_check import LLCase, run_ll_case, run_ll_graph

    R, TL = info.world_size, 128
    _poison_allocator(torch.device("cuda", torch.cuda.current_device()))
    buf = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(TL, H, R, E), low_latency_mode=True,
                 num_qps_per_rank=E // R, explicitly_destroy=True)
    stats = torch.zeros(E // R, dtype=torch.int32, device="cuda")
    cases = [LLCase(51, [TL] * R, TL, H, E, K, masked_ratio=0.1),
             LLCase(52, [TL - 3 * r for r in range(R)], TL, H, E, K, use_fp8=True, hook=True),
             LLCase(53, [TL] * R, TL, H, E, K, use_fp8=True, round_scale=True, use_ue8m0=True, zero_copy=True,
                    async_mode=True),
             LLCase(54, [1] * R, TL, H, E, K, use_fp8=True),
             # the tightest num_max_recv_tokens_per_expert
             LLCase(56, [TL] * R, TL, H, E, K, masked_ratio=0.1, cap="tight"),
             LLCase(57, [TL - 5 * r for r in range(R)], TL, H, E, K, use_fp8=True, round_scale=True,
                    use_ue8m0=True, zero_copy=True, hook=True, cap="tight")]
    out = [run_ll_case(buf, case, stats) for case in cases for _ in range(2)]
    out.append(run_ll_graph(buf, LLCase(55, [TL] * R, TL, H, E, K, use_fp8=True, masked_ratio=0.05)))
    if R > 1:  # a bound too small: every rank raises, the device flag is set, clear_overflow() mends it
        from tritonep.testing.capacity_check import run_ll_overflow_check

        out.append(run_ll_overflow_check(buf, TL, H))
    # the pair as operators (tritonep.ops), eager and compiled (aot_eager: the stand-in expert's
    # multiply-add stays unfused, so the results stay bit-exact)
    from tritonep.testing.ops_check import low_latency_step, run_low_latency_ops_case

    compiled = torch.compile(low_latency_step, fullgraph=True, backend="aot_eager")
    out.append(run_low_latency_ops_case(buf, LLCase(58, [TL] * R, TL, H, E, K, use_fp8=True, cap="tight"), compiled))
    buf.destroy()
    return out


def test_low_latency():
    """V1's low-latency dispatch and combine at decode sizes (128 tokens per rank, hidden 7168, top-8
    of 256), eagerly and replayed in a CUDA graph, bit-exact against the reference."""
    parallel_launch(NUM_RANKS, _ll_worker, backend=LAUNCH)


def _shrink_worker(info):
    os.environ["TRITONEP_GPU_TIMEOUT_SECS"] = "3"  # the wait for the dead rank (before the buffer reads it)
    from tritonep.testing.low_latency_check import run_shrink_case

    return run_shrink_case(info.group, T=128, H=H)


def test_low_latency_shrink():
    """Shrink mode on the GPU: the last rank never calls; the others skip it, masked beforehand or
    by the first wait for it that times out."""
    parallel_launch(max(NUM_RANKS, 2), _shrink_worker, backend=LAUNCH)


def _pp_worker(info):
    import time

    from tritonep import CommTimeoutError
    from tritonep.testing.pp_check import run_pp_exchange

    buf = ElasticBuffer(info.group, num_bytes=ElasticBuffer.get_pp_buffer_size_hint(4096 * 256, 4),
                        num_gpu_timeout_secs=60, explicitly_destroy=True)
    out = run_pp_exchange(buf, 6, 4, scale=256)  # messages of 8 KB .. 1 MB
    torch.cuda.synchronize()
    t, got = torch.randn(1 << 18, device="cuda"), torch.empty(1 << 18, device="cuda")
    kernels = _kernels_of(lambda: (buf.pp_send(t, (info.rank + 1) % info.world_size),
                                   buf.pp_recv(got, (info.rank - 1) % info.world_size)))
    assert not kernels, f"pp_send/pp_recv launched kernels: {kernels}"
    # a receive whose message never comes: the stream goes on after the timeout, the next call raises
    buf._pipe.signals.watchdog.timeout_s = 1.0
    t = torch.zeros(64, device="cuda")
    buf.pp_recv(t, (info.rank - 1) % info.world_size)
    time.sleep(3.0)
    torch.cuda.synchronize()
    with pytest.raises(CommTimeoutError, match="pp_recv"):
        buf.pp_send(t, (info.rank + 1) % info.world_size)
    buf.destroy()
    return out


def test_pp_send_recv():
    """Pipeline send/recv between ring neighbours by the copy engine and stream memory operations,
    bit-exact; a receive that never gets its message ends in CommTimeoutError, not a hang."""
    parallel_launch(NUM_RANKS, _pp_worker, backend=LAUNCH)


def _kernels_of(fn) -> dict:
    """The GPU kernels ``fn`` launches (name: count), by the profiler."""
    from tritonep.testing.gpu_trace import gpu_activities, kernels_of

    return kernels_of(gpu_activities(fn))


def _agrs_worker(info):
    from tritonep.testing.agrs_check import run_agrs_schedule, run_reduce_scatter

    shape, max_calls = (32, 64, 256), 4
    session = ElasticBuffer.get_agrs_num_max_session_bytes(info.group, [shape] * 3 * max_calls, torch.bfloat16)
    buf = ElasticBuffer(info.group, num_bytes=ElasticBuffer.get_agrs_buffer_size_hint(info.group, session),
                        num_gpu_timeout_secs=60, explicitly_destroy=True)
    buf.agrs_set_config(session, max_calls)
    sessions = run_agrs_schedule(buf, 5, 24, shape, max_calls)
    run_reduce_scatter(buf, 6, shape)
    t = torch.randn(shape, device="cuda").to(torch.bfloat16)

    def one_all_gather():
        with buf.agrs_new_session():
            out, wait = buf.all_gather(t)
            wait()
    kernels = _kernels_of(one_all_gather)
    assert not kernels, f"an all-gather session launched kernels: {kernels}"
    buf.destroy()
    return sessions


def test_agrs_sessions():
    """All-gather sessions and reduce-scatter by the copy engine and stream memory operations,
    bit-exact; an all-gather session launches no kernel (profiler)."""
    parallel_launch(max(NUM_RANKS, 2), _agrs_worker, backend=LAUNCH)


def _engram_worker(info):
    from tritonep.testing.engram_check import run_engram_case

    N, n_tok, e = 4096, 512, 8
    gpu, cpu = ElasticBuffer.get_engram_storage_size_hint(N, H, n_tok * e)
    buf = ElasticBuffer(info.group, num_bytes=gpu + cpu, num_cpu_bytes=cpu, explicitly_destroy=True)
    run_engram_case(buf, 7, N, H, n_tok, e, fp8=False)
    run_engram_case(buf, 8, N, H, n_tok, e, fp8=True)
    buf.destroy()
    return True


def test_engram():
    """Engram at hidden 7168: tables in the ranks' shared host memory, rows fetched by global id
    (BF16, FP8 with both scale layouts), bit-exact against the reference."""
    parallel_launch(max(NUM_RANKS, 2), _engram_worker, backend=LAUNCH)


def _ops_worker(info, backend):
    import torch

    from tritonep.testing.ops_check import OpsCase, run_ops_case, step

    R, TO = info.world_size, 256
    _poison_allocator(info.device)
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=TO, hidden=2048, num_topk=K, num_gpu_timeout_secs=30,
                        explicitly_destroy=True, config=_config())
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    cases = [OpsCase(71, [TO] * R, 2048, E, K, masked_ratio=0.1, with_bias=True),
             OpsCase(72, [TO - 17 * r for r in range(R)], 2048, E, K, expand=True, expert_alignment=128)]
    out = [run_ops_case(buf, case, compiled) for case in cases]
    buf.destroy()
    return out


@pytest.mark.parametrize("backend", ["inductor"])
def test_ops_autograd_and_compile(backend):
    """tritonep.ops (custom operators with autograd): forward and gradients bit-exact against the
    reference, and the same step under torch.compile(fullgraph=True) (no graph break) bit-exact
    against eager."""
    out = parallel_launch(NUM_RANKS, _ops_worker, backend, backend=LAUNCH)
    print(f"\nops, {NUM_RANKS} ranks, torch.compile backend {backend}: {out[0]}")


def _moe_worker(info):
    from tritonep.testing.moe_check import run_moe_check

    TM = 256
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=TM, hidden=2048, num_topk=K, num_gpu_timeout_secs=30,
                        explicitly_destroy=True, config=_config())
    out = run_moe_check(buf, TM, 2048, 512, 64, K, compile_backend="inductor", graph=True)
    buf.destroy()
    return out


def test_moe_layer():
    """tritonep.nn.MoE (grouped GEMM experts): forward and gradients close to the layer in one
    process, a compiled training step (inductor, fullgraph: no graph break) close to eager, and the
    forward in a CUDA graph equal to eager."""
    out = parallel_launch(NUM_RANKS, _moe_worker, backend=LAUNCH)
    print(f"\nMoE layer, {NUM_RANKS} ranks: {out[0]}")
