"""get_theoretical_num_sms: the model's arithmetic (pure function) and the buffer method."""
import math

import pytest

from tritonep import sm_model


def test_distinct_groups_matches_brute_force():
    # E=8 experts in G=4 groups of 2, k=2 distinct experts: enumerate every pair
    import itertools

    pairs = list(itertools.combinations(range(8), 2))
    mean = sum(len({e // 2 for e in p}) for p in pairs) / len(pairs)
    assert math.isclose(sm_model.distinct_groups(4, 8, 2), mean)
    assert math.isclose(sm_model.distinct_groups(1, 8, 2), 1.0)
    with pytest.raises(ValueError, match="equal groups"):
        sm_model.distinct_groups(3, 8, 2)


def test_theoretical_num_sms_worked_example_and_limits():
    # the docstring's example: 2 ranks, 430 GB/s, 23 GB/s per SM -> 1.25 * 37.4 -> 47 -> even: 48
    assert sm_model.theoretical_num_sms(2, 256, 8, 430.0, 132) == 48
    # more ranks: a smaller share of the written bytes crosses NVLink per byte the SMs write
    assert sm_model.theoretical_num_sms(8, 256, 8, 430.0, 132) == 28
    assert sm_model.theoretical_num_sms(2, 256, 8, 430.0, 32) == 32  # capped at the device
    assert sm_model.theoretical_num_sms(1, 256, 8, 430.0, 132) == 4  # nothing crosses a link
    assert sm_model.theoretical_num_sms(2, 256, 8, 10.0, 132) == 4  # floor of 4
    # DeepEP's per-SM rates give DeepEP-like answers
    assert sm_model.theoretical_num_sms(2, 256, 8, 430.0, 132, sm_write_gbs=50.0) == 22


def test_hybrid_mode_network_bottleneck():
    # the docstring's example: 2 hosts x 8, 50 GB/s of network: stage B only keeps up with the
    # network (18), fewer SMs than one host of 8 needs for NVLink (28)
    assert sm_model.theoretical_num_sms(16, 256, 8, 430.0, 132, num_scaleout_ranks=2, rdma_gbs=50.0) == 18
    # a network faster than NVLink can drain: NVLink-bound, the one-host answer over U = 8 ranks
    assert sm_model.theoretical_num_sms(16, 256, 8, 430.0, 132, num_scaleout_ranks=2, rdma_gbs=500.0) == 28
    # the slower the network, the fewer SMs (down to the floor)
    counts = [sm_model.theoretical_num_sms(32, 256, 8, 430.0, 132, num_scaleout_ranks=4, rdma_gbs=g)
              for g in (1.0, 12.5, 25.0, 50.0)]
    assert counts == sorted(counts) and counts[0] == 4
    # one rank per host: nothing for stage B to move over NVLink
    assert sm_model.theoretical_num_sms(4, 256, 8, 430.0, 132, num_scaleout_ranks=4, rdma_gbs=50.0) == 4
