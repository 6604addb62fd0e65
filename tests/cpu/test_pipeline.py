"""Pipeline-parallel send/recv (``pp_*``) on CPU ranks: messages of many sizes to both ring
neighbours, in flight up to the slot count, delivered bit for bit in send order (two ranks:
prev == next); a receive that never gets its message fails naming the peer; bad input refused."""
import pytest

from tritonep.testing.launch import parallel_launch


def _pp_test(info):
    import torch

    from tritonep import CommTimeoutError, ElasticBuffer
    from tritonep.testing.pp_check import run_pp_exchange

    buf = ElasticBuffer(info.group, num_bytes=2 << 20, num_gpu_timeout_secs=60, explicitly_destroy=True)
    counts = run_pp_exchange(buf, 4, 3)
    R, r = info.world_size, info.rank
    prev, nxt = (r - 1) % R, (r + 1) % R
    t = torch.zeros(8)
    for kwargs, match in [(dict(t=torch.zeros(9)), "multiple of 32"), (dict(t=torch.zeros(1040)), "at most"),
                          (dict(t=torch.zeros(16)[::2]), "contiguous"), (dict(peer=r + R), "neighbour")]:
        args = dict(t=t, peer=nxt)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            buf.pp_send(args["t"], args["peer"])
    with pytest.raises(ValueError, match="positive"):
        buf.pp_set_config(0, 2)
    with pytest.raises(ValueError, match="get_pp_buffer_size_hint"):
        buf.pp_set_config(1 << 20, 4)
    buf._pipe.signals.timeout_s = 1.0
    with pytest.raises(CommTimeoutError, match=f"rank {r} .* waiting for rank {prev}"):
        buf.pp_recv(t, prev)  # nobody sent it
    return counts


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_pp_send_recv(num_ranks):
    out = parallel_launch(num_ranks, _pp_test)
    assert sum(c["sent"] for c in out) == sum(c["got"] for c in out)


def test_pp_needs_configuration():
    parallel_launch(2, _unconfigured)


def _unconfigured(info):
    import torch

    from tritonep import ElasticBuffer

    buf = ElasticBuffer(info.group, num_bytes=2 << 20)
    with pytest.raises(ValueError, match="pp_set_config first"):
        buf.pp_send(torch.zeros(8), (info.rank + 1) % 2)
    assert ElasticBuffer.get_pp_buffer_size_hint(58720256, 4) == 4 * 58720256 * 4 // (2 << 20) * (2 << 20)
    return True


def _dist_pp(info):
    from tritonep import CommTimeoutError, ElasticBuffer
    from tritonep.pipeline import DistPipe
    from tritonep.testing.pp_check import run_pp_exchange

    buf = ElasticBuffer(info.group, num_bytes=2 << 20, backend="alltoall", num_gpu_timeout_secs=60)
    counts = run_pp_exchange(buf, 4, 2)
    assert isinstance(buf._pipe, DistPipe)
    import torch

    buf._pipe.timeout_s = 1.0
    with pytest.raises(CommTimeoutError, match=f"waiting for rank {(info.rank - 1) % info.world_size}"):
        buf.pp_recv(torch.zeros(8), (info.rank - 1) % info.world_size)
    return counts


def test_pp_over_torch_distributed():
    """Without a heap that maps the neighbours (here the alltoall backend; across hosts alike) the
    messages go by torch.distributed point-to-point, with the same order and checks."""
    out = parallel_launch(3, _dist_pp)
    assert sum(c["sent"] for c in out) == sum(c["got"] for c in out)
