"""Domains (hosts x ranks per host): found from host names or declared with TRITONEP_SCALEUP_SIZE;
a group across declared hosts maps no peer's memory and stays bit-exact in direct mode (the
all-to-all backend); tests/cpu/test_hybrid.py has hybrid mode."""
import os

import pytest

from tritonep.domains import Domains, hosts_from_names
from tritonep.testing.launch import parallel_launch


def test_ranks_per_host_from_names():
    assert hosts_from_names(["a", "a", "b", "b"]) == 2
    assert hosts_from_names(["a"] * 8) == 8
    assert hosts_from_names(["a", "b", "c"]) == 1
    assert hosts_from_names(["a"] * 8, scaleup_size=4) == 4  # declared hosts on one machine


@pytest.mark.parametrize("names, size, fragment", [
    (["a", "a", "b", "b", "a", "a", "b", "b"], 0, "not host-major"),
    (["a", "a", "a", "b"], 0, "different numbers of ranks"),
    (["a"] * 6, 4, "does not divide"),
    (["a", "a", "b", "b"], 4, "run on"),
])
def test_bad_layouts_raise(names, size, fragment):
    with pytest.raises(ValueError, match=fragment):
        hosts_from_names(names, size)


def test_logical_domains_and_backends():
    d = Domains(num_ranks=8, num_rdma_ranks=2, num_nvlink_ranks=4)
    assert d.logical(allow_hybrid_mode=False) == (1, 8)
    assert d.logical(allow_hybrid_mode=True) == (2, 4)
    assert Domains(8, 1, 8).logical(True) == (1, 8)
    assert (d.backend("auto", True), d.backend("auto", False)) == ("hybrid", "direct")
    assert Domains(8, 2, 4, peer_access=False).backend("auto", False) == "alltoall"
    assert Domains(8, 1, 8).backend("auto", True) == "symmetric"
    assert Domains(8, 1, 8, peer_access=False).backend("auto", True) == "alltoall"
    with pytest.raises(ValueError, match="across hosts whose ranks map"):
        Domains(8, 1, 8).backend("direct", False)
    with pytest.raises(ValueError, match="spans 2 hosts"):
        d.backend("symmetric", True)
    with pytest.raises(ValueError, match="needs a group across hosts"):
        Domains(8, 1, 8).backend("hybrid", True)


def _declared_hosts_worker(info, scaleup_size):
    os.environ["TRITONEP_SCALEUP_SIZE"] = str(scaleup_size)  # before the first buffer reads it
    import tritonep
    from tritonep import ElasticBuffer, heap
    from tritonep.testing.ep_check import Case, run_case

    R, r = info.world_size, info.rank
    heaps = []
    create_heap = heap.create_heap
    heap.create_heap = lambda *a, **k: heaps.append(1) or create_heap(*a, **k)  # (none: backend="alltoall")
    assert tritonep.get_physical_domain_size(info.group) == (R // scaleup_size, scaleup_size)
    assert tritonep.get_logical_domain_size(info.group) == (R // scaleup_size, scaleup_size)
    assert tritonep.get_logical_domain_size(info.group, allow_hybrid_mode=False) == (1, R)
    from tritonep import sizing

    hint = ElasticBuffer.get_buffer_size_hint(info.group, 16, 256, 4)  # DeepEP's hybrid formula
    assert hint == sizing.get_buffer_size_hint(R, 16, 256, 4, num_scaleout_ranks=R // scaleup_size,
                                               num_nvlink_ranks=scaleup_size)
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=16, hidden=256, num_topk=4, allow_hybrid_mode=False,
                        backend="alltoall")
    assert buf.backend == "alltoall" and not heaps, "ranks of different hosts mapped each other's memory"
    assert buf.get_physical_domain_size() == (R // scaleup_size, scaleup_size)
    assert (buf.num_rdma_ranks, buf.num_nvlink_ranks) == (R // scaleup_size, scaleup_size)
    assert buf.get_logical_domain_size() == (buf.num_scaleout_ranks, buf.num_scaleup_ranks) == (1, R)
    assert (buf.scaleout_rank_idx, buf.scaleup_rank_idx) == (0, r)
    run_case(buf, Case(seed=90, num_tokens=[16 - r for r in range(R)], hidden=256, num_experts=2 * R, num_topk=4,
                       num_bias=1, masked_ratio=0.1))
    with pytest.raises(ValueError, match="spans 2 hosts"):
        ElasticBuffer(info.group, num_max_tokens_per_rank=16, hidden=256, backend="symmetric")
    buf.destroy()


def test_declared_hosts_map_no_peer_memory():
    parallel_launch(4, _declared_hosts_worker, 2)


def _bad_size_worker(info):
    os.environ["TRITONEP_SCALEUP_SIZE"] = "3"
    from tritonep import ElasticBuffer

    with pytest.raises(ValueError, match="does not divide the group's 4 ranks"):
        ElasticBuffer(info.group, num_max_tokens_per_rank=16, hidden=256)


def test_declared_size_must_divide_the_group():
    parallel_launch(4, _bad_size_worker)
