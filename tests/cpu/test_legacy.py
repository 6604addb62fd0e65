"""DeepEP V1's ``Buffer`` (normal mode) on CPU ranks: layout, dispatch with and without top-k, FP8,
``num_worst_tokens``, cached dispatch and combine (biases, summed weights), bit-exact against the
reference; V1's configs and size hints; bad input refused before anything moves."""
import pytest

from tritonep.testing.launch import parallel_launch


def _legacy_worker(info, seed):
    from tritonep import Buffer, Config
    from tritonep.testing.legacy_check import LegacyCase, run_legacy_case

    R = info.world_size
    buf = Buffer(info.group, num_nvl_bytes=4 << 20, explicitly_destroy=True)
    assert (buf.rank, buf.group_size) == (info.rank, R)
    cases = [LegacyCase(seed, [12 - r % 5 for r in range(R)], 256, 4 * R, 8, "skewed", 0.1, num_bias=2, worst=True),
             LegacyCase(seed + 1, [9] * R, 128, 2 * R, 3, with_topk=False, num_bias=1),
             LegacyCase(seed + 2, [0] + [10] * (R - 1), 256, 2 * R, 4, fp8=True, worst=True),
             LegacyCase(seed + 3, [7] * R, 128, R, 1, "one_expert", async_mode=True, previous_event=True),
             LegacyCase(seed + 4, [11] * R, 128, 4 * R, 6, masked_ratio=0.3, with_topk=False, fp8=True)]
    out = [run_legacy_case(buf, case) for case in cases]
    config = Buffer.get_dispatch_config(2)
    assert isinstance(config, Config) and config.num_max_nvl_chunked_recv_tokens == 256
    buf.destroy()
    return out


@pytest.mark.parametrize("num_ranks", [2, 3, 4, 8])
def test_legacy_buffer_is_exact(num_ranks):
    parallel_launch(num_ranks, _legacy_worker, 900 + num_ranks)


def _hosts_worker(info, seed):
    import os

    os.environ["TRITONEP_SCALEUP_SIZE"] = "2"  # 2 hosts of 2 ranks (before the first buffer reads it)
    import pytest
    import torch

    from tritonep import Buffer
    from tritonep.testing.legacy_check import LegacyCase, run_legacy_case

    R = info.world_size
    buf = Buffer(info.group, num_nvl_bytes=4 << 20, explicitly_destroy=True)
    assert buf._elastic.backend == "direct" and buf._elastic.get_physical_domain_size() == (2, 2)
    cases = [LegacyCase(seed, [12 - r % 5 for r in range(R)], 256, 4 * R, 8, "skewed", 0.1, num_bias=2, worst=True),
             LegacyCase(seed + 1, [9] * R, 128, 2 * R, 3, with_topk=False, num_bias=1),
             LegacyCase(seed + 2, [0] + [10] * (R - 1), 256, 2 * R, 4, fp8=True, async_mode=True,
                        previous_event=True)]
    out = [run_legacy_case(buf, case) for case in cases]
    x = torch.randn((4, 128)).to(torch.bfloat16)
    topk = torch.tensor([[0, 1], [2, 3], [-1, 5], [6, 7]])
    per_rank, per_host, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, 2 * R)
    with pytest.raises(ValueError, match="num_tokens_per_rdma_rank"):
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=topk, topk_weights=torch.ones((4, 2)))
    with pytest.raises(NotImplementedError, match="inside one host"):
        Buffer(info.group, 0, 2 << 20, low_latency_mode=True)
    buf.destroy()
    return out


def test_legacy_buffer_across_hosts():
    """V1's internode mode: 2 declared hosts of 2 CPU ranks, the same checks plus the internode
    layout and handle; low-latency mode across hosts is refused."""
    parallel_launch(4, _hosts_worker, 950)


def _bad_input_worker(info):
    import torch

    from tritonep import Buffer, RecvOverflowError
    from tritonep.testing.gate import make_inputs

    R = info.world_size
    with pytest.raises(ValueError, match="multiple of 128"):
        Buffer(info.group, num_nvl_bytes=1000)
    with pytest.raises(ValueError, match="enable_shrink"):
        Buffer(info.group, num_nvl_bytes=0, num_rdma_bytes=1 << 20, enable_shrink=True)
    with pytest.raises(ValueError, match="group"):
        Buffer(None)
    buf = Buffer(info.group, num_nvl_bytes=2 << 20)
    x, topk, w = make_inputs(5, info.rank, 8, 128, 2 * R, 2)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, 2 * R)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    with pytest.raises(ValueError, match="needs num_tokens_per_rank"):
        buf.dispatch(x, topk_idx=topk, topk_weights=w)
    with pytest.raises(ValueError, match="together"):
        buf.dispatch(x, topk_idx=topk, **layout)
    with pytest.raises(ValueError, match="allocate_on_comm_stream"):
        buf.dispatch(x, topk_idx=topk, topk_weights=w, allocate_on_comm_stream=True, **layout)
    with pytest.raises(ValueError, match="num_worst_tokens"):  # a rank sends more than ceil(W / R)
        buf.dispatch(x, topk_idx=topk, topk_weights=w, num_worst_tokens=R, **layout)
    # a rank that would receive more than num_worst_tokens rows: every rank raises (V1 drops them)
    to_rank0 = torch.stack([torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.int64)], dim=1)
    r0_rank, _, r0_expert, r0_in_rank, _ = buf.get_dispatch_layout(to_rank0, 2 * R)
    with pytest.raises(RecvOverflowError, match="rank 0"):
        buf.dispatch(x, topk_idx=to_rank0, topk_weights=w, num_worst_tokens=8 * R - 1, num_tokens_per_rank=r0_rank,
                     is_token_in_rank=r0_in_rank, num_tokens_per_expert=r0_expert)
    buf.clear_overflow()
    n = 1 << 14  # more tokens than 2 MiB holds
    big_topk = torch.zeros((n, 2), dtype=torch.int64)
    big_topk[:, 1] = 1
    big_rank, _, big_expert, big_in_rank, _ = buf.get_dispatch_layout(big_topk, 2 * R)
    with pytest.raises(ValueError, match="bytes of num_nvl_bytes"):
        buf.dispatch(torch.zeros((n, 128), dtype=torch.bfloat16), topk_idx=big_topk, topk_weights=torch.zeros(n, 2),
                     num_tokens_per_rank=big_rank, is_token_in_rank=big_in_rank, num_tokens_per_expert=big_expert)
    with pytest.raises(TypeError, match="handle"):
        buf.combine(x, handle=(1, 2, 3))
    with pytest.raises(ValueError, match="low_latency_mode"):
        buf.low_latency_dispatch(x, topk, 8, 2 * R)
    # the buffer still works, and a handle of another Buffer is refused
    recv, _, _, _, handle, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, **layout)
    other = Buffer(info.group, num_nvl_bytes=2 << 20)
    with pytest.raises(ValueError, match="another Buffer"):
        other.combine(recv, handle)
    with pytest.raises(ValueError, match="rows"):
        buf.combine(recv[:-1] if len(recv) else torch.zeros((1, 128), dtype=torch.bfloat16), handle)
    out, _, _ = buf.combine(recv, handle)
    assert out.shape == x.shape
    return True


def test_legacy_bad_input():
    parallel_launch(2, _bad_input_worker)


def test_v1_configs_and_hints():
    from tritonep import Buffer, Config

    with pytest.raises(ValueError, match="send"):
        Config(20, 8, 8)
    with pytest.raises(ValueError, match="half"):
        Config(20, 6, 256, 16, 10)
    assert Config(24, 8, 256, 16, 130).num_max_rdma_chunked_recv_tokens == 144  # rounded up to the send chunk
    with pytest.raises(ValueError, match="tuned"):
        Buffer.get_dispatch_config(5)
    assert Buffer.get_combine_config(8).num_max_nvl_chunked_send_tokens == 4
    # room for 4096 tokens per rank of DeepSeek-V3's rows at 8 ranks
    from tritonep import sizing

    hint = Config(24, 8, 256).get_nvl_buffer_size_hint(7168 * 2, 8)
    assert hint % 128 == 0 and hint >= sizing.dispatch_bytes(8, 4096, 7168 * 2, 56, 32)
    assert Config().get_rdma_buffer_size_hint(7168 * 2, 16) == 0
    # V1's low-latency formula (spec 8.5): 128 tokens, hidden 7168, 8 ranks, 288 experts
    T, H, E = 128, 7168, 288
    disp, comb = 16 + max(2 * H, H + 4 * (H // 128)), 4 * (H // 128) + 2 * H
    send, recv = max(T * disp, E * T * comb), max(E * T * disp, E * T * comb)
    want = (2 * (send + recv + -(-4 * E // 128) * 128) + 128) // 128 * 128
    from tritonep.low_latency import heap_bytes

    assert Buffer.get_low_latency_rdma_size_hint(T, H, 8, E) == max(want, heap_bytes(T, H, E))
    with pytest.raises(ValueError, match="even"):
        Buffer.set_num_sms(7)
