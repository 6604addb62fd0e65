"""The POSIX shared-memory heap: peers see each other's bytes, and no segment outlives set-up."""
import ctypes
import os
import time

import pytest
import torch

from tritonep.heap.shm import NAME_PREFIX, SHM_DIR, ShmHeap
from tritonep.testing.launch import parallel_launch


def _segments(pid=None):
    names = [n for n in os.listdir(SHM_DIR) if n.startswith(NAME_PREFIX)]
    return [n for n in names if pid is None or n.startswith(f"{NAME_PREFIX}{pid}_")]


def _peer_worker(info):
    heap = ShmHeap(info.group, 1 << 16, 8)
    assert not _segments(os.getpid()), "the segment name must be unlinked once every rank mapped it"
    assert int(heap.signals.abs().sum()) == 0
    heap.data[:256] = torch.arange(256, dtype=torch.int32).to(torch.uint8) ^ info.rank
    heap.signals[info.rank] = 100 + info.rank
    torch.distributed.barrier()
    for peer in range(info.world_size):
        got = ctypes.string_at(int(heap.data_ptrs[peer]), 256)
        want = bytes(((i % 256) ^ peer) for i in range(256))
        assert got == want, f"rank {info.rank} reads wrong bytes from rank {peer}"
        word = ctypes.c_int32.from_address(int(heap.signal_ptrs[peer]) + 4 * peer).value
        assert word == 100 + peer
    torch.distributed.barrier()
    heap.destroy()
    heap.destroy()  # idempotent
    return os.getpid()


def test_peers_read_each_other_and_nothing_is_left():
    before = set(_segments())
    pids = parallel_launch(3, _peer_worker)
    left = [n for n in set(_segments()) - before if any(n.startswith(f"{NAME_PREFIX}{p}_") for p in pids)]
    assert not left


def _crash_worker(info, where):
    if where == "before" and info.rank == 1:
        raise RuntimeError("rank 1 fails before building its heap")
    if where == "before":
        try:
            ShmHeap(info.group, 1 << 16, 8)
        except Exception as e:  # the collective fails because rank 1 never joins
            assert not _segments(os.getpid()), "a failed set-up must unlink its segment"
            return ("raised", type(e).__name__)
        return ("built", None)
    heap = ShmHeap(info.group, 1 << 16, 8)
    if info.rank == 1:
        os._exit(3)  # dies without any clean-up
    time.sleep(1)
    heap.destroy()
    return ("ok", os.getpid())


@pytest.mark.parametrize("where", ["before", "after"])
def test_nothing_left_when_a_rank_fails(where):
    before = set(_segments())
    out = parallel_launch(2, _crash_worker, where, allow_failures=True, pg_timeout=8)
    assert out[1][0] == "error"
    if where == "before":
        assert out[0][0] == "raised", out[0]
    assert set(_segments()) - before == set()
