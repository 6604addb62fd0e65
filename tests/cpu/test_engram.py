"""Engram on CPU ranks: tables in every rank's shared host memory, rows fetched by global id
(BF16 and FP8 with both scale layouts) bit-exact against the reference; bad input refused."""
import pytest

from tritonep.testing.launch import parallel_launch


def _engram_worker(info, seed):
    import torch

    from tritonep import ElasticBuffer
    from tritonep.testing.engram_check import run_engram_case

    N, H, n_tok, e = 64, 256, 12, 5
    gpu, cpu = ElasticBuffer.get_engram_storage_size_hint(N, H, n_tok * e)
    buf = ElasticBuffer(info.group, num_bytes=gpu + cpu, num_cpu_bytes=cpu, explicitly_destroy=True)
    assert (buf.num_bytes, buf.num_cpu_bytes) == (gpu, cpu)
    with pytest.raises(ValueError, match="engram_write first"):
        buf.engram_fetch(torch.zeros((2, 2), dtype=torch.int32))
    run_engram_case(buf, seed, N, H, n_tok, e, fp8=False)
    run_engram_case(buf, seed + 1, N, H, n_tok, e, fp8=True)
    run_engram_case(buf, seed + 2, N // 2, H // 2, n_tok, 3, fp8=False)  # rewritten, smaller
    bf = torch.zeros((N, H), dtype=torch.bfloat16)
    for args, match in [((bf.float(),), "bf16 or float8"), ((bf[:, ::2],), "contiguous"),
                        ((bf.to(torch.float8_e4m3fn),), "sf must be given"),
                        ((torch.zeros((cpu // (2 * H) + 8, H), dtype=torch.bfloat16),), "num_cpu_bytes"),
                        ((bf, torch.zeros((N, 2))), "sf must be given")]:
        with pytest.raises(ValueError, match=match):
            buf.engram_write(*args)
    with pytest.raises(ValueError, match="int32"):
        buf.engram_fetch(torch.zeros((2, 2), dtype=torch.int64))
    with pytest.raises(ValueError, match="GPU part"):
        buf.engram_fetch(torch.zeros((gpu // 128, 8), dtype=torch.int32))
    buf.destroy()
    return True


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_engram(num_ranks):
    parallel_launch(num_ranks, _engram_worker, 30 + num_ranks)


def test_engram_sizes():
    from tritonep import ElasticBuffer
    from tritonep.engram import split_bytes

    assert ElasticBuffer.get_engram_storage_size_hint(524288, 128, 512 * 24) == (4 << 20, 128 << 20)
    assert split_bytes(6 << 20, 2 << 20) == (4 << 20, 2 << 20)
    with pytest.raises(ValueError, match="larger"):
        split_bytes(2 << 20, 2 << 20)
    with pytest.raises(ValueError, match="multiple"):
        split_bytes(None, 12345)
