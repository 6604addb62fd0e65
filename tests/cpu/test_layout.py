"""The routing layout against a brute-force definition, and the docstring's worked example."""
import pytest
import torch

from tritonep.layout import compute_layout
from tritonep.testing.gate import make_topk


def test_worked_example():
    lay = compute_layout(torch.tensor([[3, 0], [1, -1], [2, 3]]), 4, 2, 1, 4)
    assert lay.dst_buffer_slot_idx.tolist() == [[4, 4], [5, -1], [-1, 5]]
    assert lay.combine_slot_idx.tolist() == [[0, 1], [0, -1], [0, 0]]
    assert lay.send_counts.tolist() == [[2, 1, 1], [2, 1, 2]]


def _brute(topk, E, R, rank, T):
    L = E // R
    n, k = topk.shape
    dst = [[-1] * k for _ in range(n)]
    cslot = [[-1] * k for _ in range(n)]
    counts = [[0] * (1 + L) for _ in range(R)]
    for t in range(n):
        smax = {}
        for s in range(k):
            e = int(topk[t, s])
            if e >= 0:
                smax[e // L] = s
                counts[e // L][1 + e % L] += 1
        order = sorted(smax, key=smax.get)
        for d, s in smax.items():
            dst[t][s] = rank * T + counts[d][0]
            counts[d][0] += 1
        for s in range(k):
            e = int(topk[t, s])
            if e >= 0:
                cslot[t][s] = order.index(e // L)
    return dst, cslot, counts


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    R = int(torch.randint(1, 6, (1,), generator=g))
    L = int(torch.randint(1, 5, (1,), generator=g))
    k = min(R * L, int(torch.randint(1, 9, (1,), generator=g)))
    n = int(torch.randint(0, 40, (1,), generator=g))
    routing = ["uniform", "skewed", "one_expert"][seed % 3]
    topk = make_topk(seed, 0, n, R * L, k, routing, masked_ratio=0.3 * (seed % 2))
    rank, T = seed % R, n + 3
    lay = compute_layout(topk, R * L, R, rank, T)
    dst, cslot, counts = _brute(topk, R * L, R, rank, T)
    assert lay.dst_buffer_slot_idx.tolist() == dst
    assert lay.combine_slot_idx.tolist() == cslot
    assert lay.send_counts.tolist() == counts
    assert lay.is_token_in_rank.tolist() == [[any(e >= 0 and e // L == d for e in row.tolist()) for d in range(R)]
                                             for row in topk]


@pytest.mark.parametrize("n, k, E, seed", [(5, 2, 8, 0), (24, 4, 16, 1), (300, 8, 64, 2), (130, 3, 40, 3), (0, 4, 8, 4)])
def test_expert_rank_kernels_match_the_reference(n, k, E, seed):
    # expand mode's position of each (token, expert) row among this rank's rows for that expert:
    # one block, several blocks (a prefix of the earlier blocks' counts), experts in several chunks,
    # top-k not a power of two, empty slots, ids out of range and repeated experts in a row
    from tritonep.kernels import layout as kernels
    from tritonep.layout import expert_ranks

    g = torch.Generator().manual_seed(seed)
    topk = torch.randint(-1, E + 2, (n, k), generator=g)
    if n:
        topk[0, :] = topk[0, 0]
    out = torch.full((n, k), -7, dtype=torch.int32)
    counts = torch.full((max(1, kernels.expert_rank_words(n, k, E)),), -7, dtype=torch.int32)
    kernels.expert_ranks(topk_idx=topk, num_experts=E, out=out, counts=counts)
    assert torch.equal(out, expert_ranks(topk, E)), (n, k, E)
