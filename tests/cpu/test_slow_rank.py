"""A slow rank is named: one rank comes late to every dispatch (it sleeps first), and the other
ranks' ``get_wait_stats()`` name it as the rank they waited for most (their counts from it came
last). Only the order of the waits is asserted, never a duration."""
from tritonep.testing.launch import parallel_launch

DELAY_S = 3.0  # (far above what a loaded machine's interpreted kernels take between ranks)


def _worker(info):
    import time

    import torch

    from tritonep import ElasticBuffer

    R, r = info.world_size, info.rank
    slow = 1
    E = 2 * R
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=8, hidden=128, num_topk=2, num_gpu_timeout_secs=120)
    g = torch.Generator().manual_seed(r)
    x = torch.randn(8, 128, generator=g).to(torch.bfloat16)
    topk = torch.rand(8, E, generator=g).topk(2, dim=1).indices
    buf.dispatch(x, topk_idx=topk, num_experts=E)  # (compiles nothing on CPU ranks; warms the interpreter)
    buf.get_wait_stats()  # (reset)
    for _ in range(2):
        if r == slow:
            time.sleep(DELAY_S)
        buf.dispatch(x, topk_idx=topk, num_experts=E)
    stats = buf.get_wait_stats()
    after = buf.get_wait_stats()  # (the first call reset them)
    buf.destroy()
    return stats, after


def test_the_late_rank_is_named_by_the_others():
    out = parallel_launch(3, _worker)
    for rank in (0, 2):
        stats, after = out[rank]
        assert stats["dispatches"] == 2 and stats["slowest_rank"] == 1, (rank, stats)
        assert stats["wait_us"][1] == max(stats["wait_us"]), (rank, stats)
        assert after["dispatches"] == 0 and after["slowest_rank"] is None, after
