"""The reference of hybrid mode (scale-out x scale-up), the oracle of the hybrid kernels to come:
rows grouped by the source's scale-up index (spec 2.4) and the scale-up reduction level (spec 3.4)."""
import torch

from tritonep import reference
from tritonep.testing.gate import combine_input, make_inputs


def _inputs(R, n=12, H=64, E=16, k=4, seed=3):
    ins = [make_inputs(seed, s, n, H, E, k, masked_ratio=0.1) for s in range(R)]
    return [i[0] for i in ins], [i[1] for i in ins], [i[2] for i in ins]


def test_source_order_groups_by_scaleup_index():
    assert reference.source_order(4) == [0, 1, 2, 3]
    assert reference.source_order(4, 2) == [0, 2, 1, 3]
    assert reference.source_order(6, 3) == [0, 3, 1, 4, 2, 5]


def test_hybrid_dispatch_is_direct_rows_in_source_order():
    R, U, T = 4, 2, 12
    xs, topks, ws = _inputs(R)
    for d in range(R):
        direct = reference.dispatch(d, xs, topks, ws, 16, T)
        hybrid = reference.dispatch(d, xs, topks, ws, 16, T, num_scaleup_ranks=U)
        src = hybrid.recv_src_idx // T
        assert src.tolist() == sorted(src.tolist(), key=lambda s: (s % U, s))  # grouped by s % U, then rank
        order = torch.argsort(hybrid.recv_src_idx)  # the same rows as direct mode, reordered
        assert torch.equal(hybrid.recv_src_idx[order], direct.recv_src_idx)
        assert torch.equal(hybrid.recv_x[order], direct.recv_x)
        assert torch.equal(hybrid.recv_topk_idx[order], direct.recv_topk_idx)
        assert torch.equal(hybrid.num_recv_tokens_per_source, direct.num_recv_tokens_per_source)
        assert torch.equal(hybrid.num_recv_tokens_per_expert, direct.num_recv_tokens_per_expert)


def _combine(R, U, bias):
    T, E = 12, 16
    xs, topks, ws = _inputs(R)
    refs = [reference.dispatch(d, xs, topks, ws, E, T, num_scaleup_ranks=U) for d in range(R)]
    ys = [combine_input(r.recv_x, d) for d, r in enumerate(refs)]
    src = [r.recv_src_idx for r in refs]
    g = torch.Generator().manual_seed(7)
    biases = tuple(torch.randn(12, 64, generator=g).to(torch.bfloat16) for _ in range(bias))
    out = [reference.combine(r, ys, src, topks[r], E, T, bias=biases, num_scaleup_ranks=U)[0] for r in range(R)]
    direct = [reference.combine(r, ys, src, topks[r], E, T, bias=biases)[0] for r in range(R)]
    return out, direct, ys, src, topks, biases


def test_one_rank_per_host_is_direct_mode():
    out, direct, *_ = _combine(4, 1, bias=2)
    assert all(torch.equal(a, b) for a, b in zip(out, direct))


def test_scaleup_level_rounds_per_host():
    # independent of the reference's code path: per token, each host's partials summed in fp32
    # (slot order) and rounded once, then bias + the hosts' partials in position order, rounded once
    R, U, T, L = 4, 2, 12, 4
    out, direct, ys, src, topks, biases = _combine(R, U, bias=1)
    lookup = [{int(g): i for i, g in enumerate(s.tolist())} for s in src]
    for r in range(R):
        for t, row in enumerate(topks[r].tolist()):
            g = r * T + t
            ranks = {}
            for slot, e in enumerate(row):
                if e >= 0:
                    ranks[e // L] = slot  # the rank's highest slot (slots ascend)
            hosts = {}
            for d, slot in sorted(ranks.items(), key=lambda kv: kv[1]):
                hosts.setdefault(d // U, []).append((slot, ys[d][lookup[d][g]].float()))
            parts = []
            for rows in hosts.values():
                acc = rows[0][1]
                for _, v in rows[1:]:
                    acc = acc + v
                parts.append((rows[-1][0], acc.to(torch.bfloat16).float() if len(rows) > 1 else acc))
            acc = biases[0][t].float()
            for _, v in sorted(parts, key=lambda p: p[0]):
                acc = acc + v
            assert torch.equal(out[r][t], acc.to(torch.bfloat16)), (r, t)
    # and the extra rounding is visible: hybrid and direct differ somewhere on random data
    assert any(not torch.equal(a, b) for a, b in zip(out, direct))
