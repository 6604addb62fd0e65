"""Bounded outputs (``num_max_recv_tokens``) of dispatches without a host sync, on spawned CPU ranks.

Where every rank's rows fit, results are bit-exact against the reference with outputs of exactly
that many rows (the tightest capacity: the most rows any rank receives), on both kernel routes
(plain rows; expand mode and the in-kernel FP8 cast). One row fewer and every rank raises
``RecvOverflowError`` naming the rank that overflowed: the symmetric heap's kernels record it (and
then do nothing, alike on every rank, until ``clear_overflow()``), the ``alltoall`` backend raises
in the call. Nothing depends on time."""
import pytest

from tritonep import ElasticBuffer, KernelConfig, recv_capacity, sizing
from tritonep.testing.capacity_check import run_overflow_check
from tritonep.testing.ep_check import Case, run_case
from tritonep.testing.launch import parallel_launch

T = 16
TIMEOUT_S = 300


def _buffer(info, backend="symmetric", use_fp8_dispatch=False):
    num_bytes = sizing.get_buffer_size_hint(info.world_size, T, 7168, 8)
    return ElasticBuffer(info.group, num_bytes=num_bytes, num_max_tokens_per_rank=T, backend=backend,
                         use_fp8_dispatch=use_fp8_dispatch, num_gpu_timeout_secs=TIMEOUT_S,
                         config=KernelConfig(copy_engine_min_bytes=-1))


def _cases(R):
    return [
        Case(seed=31, num_tokens=[T, T // 2, 3][:R], hidden=256, num_experts=4 * R, num_topk=4,
             routing="skewed", cpu_sync=False, tight_capacity=True, num_bias=1),
        Case(seed=32, num_tokens=[5, T, 0][:R], hidden=128, num_experts=2 * R, num_topk=2, expand=True,
             expert_alignment=4, cpu_sync=False, tight_capacity=True, zero_padding=True),
        Case(seed=33, num_tokens=[T] * R, hidden=256, num_experts=2 * R, num_topk=2, routing="one_expert",
             cpu_sync=False, tight_capacity=True, quantize=True),
    ]


def _fit_worker(info, backend):
    fp8 = _buffer(info, backend, use_fp8_dispatch=True)
    plain = _buffer(info, backend)
    for case in _cases(info.world_size):
        run_case(fp8 if case.quantize else plain, case)
    fp8.destroy()
    plain.destroy()


@pytest.mark.parametrize("backend", ["symmetric", "alltoall"])
def test_tightest_capacity_is_bit_exact(backend):
    parallel_launch(3, _fit_worker, backend)


def _overflow_worker(info, backend, expand):
    buf = _buffer(info, backend)
    out = run_overflow_check(buf, T, 128, expand)
    buf.destroy()
    return out


@pytest.mark.parametrize("backend,expand", [("symmetric", False), ("symmetric", True), ("alltoall", False)])
def test_overflow_raises_on_every_rank(backend, expand):
    out = parallel_launch(3, _overflow_worker, backend, expand)
    assert expand or out[0]["rows"] == 3 * T  # (rank 1 receives every token of every rank)


def _hosts_worker(info):
    import os

    os.environ["TRITONEP_SCALEUP_SIZE"] = "2"  # 2 hosts of 2 ranks (before the first buffer reads it)
    buf = _buffer(info, "hybrid")
    out = run_overflow_check(buf, T, 128, False)
    buf.destroy()
    return out


def test_overflow_across_hosts_raises_on_every_rank():
    """Hybrid mode: only the host that overflowed sees it on its heap; every rank of both hosts
    raises in the call, and the buffer goes on."""
    out = parallel_launch(4, _hosts_worker)
    assert out[0]["rows"] == 4 * T


def _ll_worker(info):
    from tritonep import Buffer
    from tritonep.testing.capacity_check import run_ll_overflow_check
    from tritonep.testing.low_latency_check import LLCase, run_ll_case

    R, H = info.world_size, 256
    buf = Buffer(info.group, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, 4 * R), low_latency_mode=True,
                 explicitly_destroy=True)
    # the tightest bounds fit, bit-exact (BF16 with hooks; FP8 with UE8M0 scales and zero-copy combine)
    for case in (LLCase(41, [T, 9, 0][:R], T, H, 4 * R, 3, masked_ratio=0.2, hook=True, cap="tight"),
                 LLCase(42, [T] * R, T, 512, 2 * R, 2, use_fp8=True, round_scale=True, use_ue8m0=True,
                        zero_copy=True, cap="tight")):
        run_ll_case(buf, case)
    out = run_ll_overflow_check(buf, T, H)
    buf.destroy()
    return out


def test_low_latency_bounded_outputs():
    """V1's low-latency dispatch with ``num_max_recv_tokens_per_expert``: exact at the tightest
    bound; one bound too small makes every rank raise naming rank 1, until ``clear_overflow()``."""
    out = parallel_launch(3, _ll_worker)
    assert out[0] == {"rows": 3 * T, "short": 3 * T - 4}


def test_recv_capacity():
    # DeepSeek-V3 at 8 ranks: 8192 tokens per rank, top-8 of 256 experts
    worst = 8 * 8192
    assert recv_capacity(2.0, 8, 8192, 8, 256) == worst  # (expected ~0.66 of the worst case: x2 is above it)
    assert recv_capacity(1.0, 8, 8192, 8, 256) == 43376  # ceil(43373.79) to a multiple of 4
    assert recv_capacity(2.0, 8, 8192, 8, 256, expand=True) == 2 * 8192 * 8
    assert sizing.num_expanded_rows(None, worst, 8, 32, 1) == 8 * worst
    # low-latency, per expert: DeepSeek-V3 decode at 8 ranks, 128 tokens per rank: 32 rows on average
    assert recv_capacity(2.0, 8, 128, 8, 256, per_expert=True) == 64
    assert recv_capacity(100.0, 8, 128, 8, 256, per_expert=True) == 8 * 128
    with pytest.raises(ValueError):
        recv_capacity(0, 8, 8192, 8, 256)
