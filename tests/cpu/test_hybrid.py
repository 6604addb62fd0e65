"""The hybrid backend across declared hosts (TRITONEP_SCALEUP_SIZE) on CPU ranks: every token
crosses hosts at most once per destination host, the heap of stage B spans one host only, rows
come grouped by the source's scale-up index, and dispatch, combine (both reduction recipes, normal
and expanded rows) and cached dispatch are bit-exact against ``reference`` in hybrid mode."""
import os

import pytest

from tritonep.testing.launch import parallel_launch


def _hybrid_worker(info, scaleup, seed):
    os.environ["TRITONEP_SCALEUP_SIZE"] = str(scaleup)  # before the first buffer reads it
    import torch.distributed as dist

    from tritonep import ElasticBuffer, heap
    from tritonep.testing.ep_check import Case, random_cases, run_case

    heaps = []  # the global ranks of every heap's group: a heap never spans two hosts
    create_heap = heap.create_heap
    heap.create_heap = lambda group, *a, **k: heaps.append(dist.get_process_group_ranks(group)) or create_heap(
        group, *a, **k)
    R = info.world_size
    bufs = [ElasticBuffer(info.group, num_bytes=2 << 20, num_max_tokens_per_rank=24,
                          allow_multiple_reduction=amr, num_gpu_timeout_secs=300) for amr in (True, False)]
    S = R // scaleup
    host = info.rank // scaleup
    assert heaps == [list(range(host * scaleup, (host + 1) * scaleup))] * 2, heaps
    for buf in bufs:
        assert buf.backend == "hybrid"
        assert buf.get_logical_domain_size() == buf.get_physical_domain_size() == (S, scaleup)
        assert (buf.scaleout_rank_idx, buf.scaleup_rank_idx) == divmod(info.rank, scaleup)
    cases = [Case(seed=seed, num_tokens=[12 - r % 5 for r in range(R)], hidden=256, num_experts=4 * R, num_topk=8,
                  routing="skewed", masked_ratio=0.1, num_bias=2),
             Case(seed=seed + 1, num_tokens=[0] + [9] * (R - 1), hidden=128, num_experts=2 * R, num_topk=3,
                  fp8=True, cpu_sync=False, sf_col_major=True, num_bias=1),
             Case(seed=seed + 2, num_tokens=[7] * R, hidden=128, num_experts=R, num_topk=1, routing="one_expert")]
    cases += random_cases(seed + 10, R, 4, max_tokens=16)
    out = [run_case(bufs[i % 2], case) for i, case in enumerate(cases)]
    # expanded rows, both reduction recipes (without weights when there is no intermediate reduction)
    for buf in bufs:
        out.append(run_case(buf, Case(seed=seed + 4, num_tokens=[8] * R, hidden=128, num_experts=4 * R, num_topk=4,
                                      expand=True, expert_alignment=4, zero_padding=True, num_bias=1,
                                      cpu_sync=buf is bufs[0])))
    # bf16 in, FP8 out (the cast before the first step, as the all-to-all backend does it)
    fp8 = ElasticBuffer(info.group, num_bytes=2 << 20, num_max_tokens_per_rank=24, use_fp8_dispatch=True)
    out.append(run_case(fp8, Case(seed=seed + 3, num_tokens=[10] * R, hidden=256, num_experts=2 * R, num_topk=2,
                                  quantize=True, round_scale=True, num_bias=1)))
    fp8.destroy()
    # the rows that cross hosts: one per (token, other destination host), fewer than direct mode's
    from tritonep.layout import network_rows
    from tritonep.testing.gate import make_inputs

    x, topk, _ = make_inputs(seed + 50, info.rank, 24, 128, 4 * R, 8)
    handle = bufs[0].dispatch(x, topk_idx=topk, num_experts=4 * R)[3]
    sent = handle.backend_state.rail.backend_state.send_splits  # stage A's rows to each host
    crossing = sum(n for h, n in enumerate(sent) if h != host)
    assert crossing == network_rows(topk, 4 * R, R, info.rank, scaleup, hybrid=True)
    assert crossing <= network_rows(topk, 4 * R, R, info.rank, scaleup, hybrid=False)
    for buf in bufs:
        buf.destroy()
    return out


@pytest.mark.parametrize("hosts, per_host", [(2, 2), (2, 3), (4, 2), (2, 4)])
def test_hybrid_backend_is_exact(hosts, per_host):
    parallel_launch(hosts * per_host, _hybrid_worker, per_host, 300 + hosts * 10 + per_host)


@pytest.mark.parametrize("hosts", [2, 4, 8])
def test_network_rows_deepseek_routing(hosts):
    # top-8 of 256 experts, 8 ranks per host: hybrid sends tokens x distinct other destination
    # hosts exactly, never more than direct mode
    from tritonep.layout import network_rows
    from tritonep.testing.gate import make_topk

    R, U, E, n = 8 * hosts, 8, 256, 512
    for rank in (0, R - 1):
        topk = make_topk(1, rank, n, E, 8)
        hybrid = network_rows(topk, E, R, rank, U, hybrid=True)
        direct = network_rows(topk, E, R, rank, U, hybrid=False)
        dest_hosts = [{int(e) // (E // R) // U for e in row} - {rank // U} for row in topk]
        assert hybrid == sum(len(h) for h in dest_hosts) <= direct
