"""All-gather sessions (AGRS) and reduce-scatter on CPU ranks: a random schedule of all-gathers (one
tensor or several, in place or not, fetched later, sessions reused), each output the stack of every
rank's tensor bit for bit; reduce-scatter against the fp32 sum in rank order; bad input refused."""
import pytest

from tritonep.testing.launch import parallel_launch

SHAPE = (4, 8, 16)


def _agrs_worker(info, seed):
    import torch

    from tritonep import ElasticBuffer
    from tritonep.testing.agrs_check import run_agrs_schedule, run_reduce_scatter

    max_calls = 4
    session = ElasticBuffer.get_agrs_num_max_session_bytes(info.group, [SHAPE] * 3 * max_calls, torch.bfloat16)
    buf = ElasticBuffer(info.group, num_bytes=ElasticBuffer.get_agrs_buffer_size_hint(info.group, session),
                        num_gpu_timeout_secs=60, explicitly_destroy=True)
    buf.agrs_set_config(session, max_calls)
    sessions = run_agrs_schedule(buf, seed, 24, SHAPE, max_calls)
    run_reduce_scatter(buf, seed, SHAPE)
    run_reduce_scatter(buf, seed + 1, (3, 5), torch.float32)
    # bad input, refused before anything moves
    t = torch.zeros(SHAPE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no AGRS session"):
        buf.all_gather(t)
    with pytest.raises(ValueError, match="no AGRS session"):
        buf.destroy_agrs_session()
    with buf.agrs_new_session():
        with pytest.raises(ValueError, match="already open"):
            buf.create_agrs_session()
        with pytest.raises(ValueError, match="contiguous"):
            buf.all_gather(torch.zeros(8, 8).T)
        with pytest.raises(ValueError, match="no tensor"):
            buf.all_gather([])
        inplace = buf.agrs_get_inplace_tensor(SHAPE, torch.bfloat16)
        with pytest.raises(ValueError, match="in-place tensor"):
            buf.all_gather([t, inplace])  # the in-place slice belongs to the first region
        with pytest.raises(ValueError, match="flush"):
            buf.all_gather(torch.zeros(session, dtype=torch.uint8))
        out, wait = buf.all_gather(inplace)
    with pytest.raises(ValueError, match="ended"):
        wait()
    with pytest.raises(ValueError, match="at most 32"):
        buf.agrs_set_config(session, 33)
    with pytest.raises(ValueError, match="get_agrs_buffer_size_hint"):
        buf.agrs_set_config(buf.num_bytes + 32, 2)
    buf.destroy()
    return sessions


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_agrs_sessions(num_ranks):
    out = parallel_launch(num_ranks, _agrs_worker, 60 + num_ranks)
    assert len(set(out)) == 1 and out[0] > 1  # the same schedule everywhere, sessions reused


def _one_rank(info):
    from tritonep import ElasticBuffer

    buf = ElasticBuffer(info.group, num_bytes=2 << 20)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        buf.agrs_set_config(1024, 2)
    return True


def test_agrs_needs_two_ranks():
    parallel_launch(1, _one_rank)
