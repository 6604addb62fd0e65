"""Checks of V1's ``Buffer`` (normal mode) against the reference, bit for bit, shared by the CPU and
GPU tests: layout, dispatch with and without top-k, FP8 with column-major scales, ``num_worst_tokens``,
cached dispatch, and combine with biases and V1's summed weights."""
from __future__ import annotations

import dataclasses

import torch

from .. import reference
from .ep_check import assert_bitwise_equal
from .gate import combine_input, make_inputs

#: the source-index base of the reference (any value: only the order of the sources matters)
T_REF = 1 << 16


@dataclasses.dataclass
class LegacyCase:
    seed: int
    num_tokens: list  # per rank
    hidden: int
    num_experts: int
    num_topk: int
    routing: str = "uniform"
    masked_ratio: float = 0.0
    with_topk: bool = True
    fp8: bool = False
    num_bias: int = 0
    worst: bool = False  # also num_worst_tokens = max tokens x R
    async_mode: bool = False
    previous_event: bool = False


def _inputs(case: LegacyCase, s: int):
    x, topk, w = make_inputs(case.seed, s, case.num_tokens[s], case.hidden, case.num_experts, case.num_topk,
                             case.routing, case.masked_ratio)
    return x, topk, w


def _fp8(x: torch.Tensor):
    """FP8 rows and float32 scales, the scales column-major as V1's test passes them."""
    data, sf = reference.quantize_fp8(x)
    return data, sf.T.contiguous().T


def want_in_rank_of(ins, s: int, L: int, host: int, per: int) -> torch.Tensor:
    """Tokens of rank ``s`` with an expert on host ``host`` (of ``per`` ranks)."""
    topk = ins[s][1]
    owner = torch.where(topk >= 0, topk // L, -1)
    return ((owner >= host * per) & (owner < (host + 1) * per)).any(dim=1).sum()


def run_legacy_case(buf, case: LegacyCase) -> dict:
    """Every V1 call of ``case`` on ``buf``, checked against the reference; raises AssertionError."""
    R, r = buf.group_size, buf.rank
    dev = buf._elastic.device
    E, L = case.num_experts, case.num_experts // R
    where = f"[rank {r}/{R} {case}] "
    ins = [_inputs(case, s) for s in range(R)]
    x, topk, w = (t.to(dev) for t in ins[r])
    # layout: per rank, per expert, membership (V1 counts every slot whose expert exists)
    per_rank, per_host, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, E)
    owner = torch.where(topk >= 0, topk // L, -1).cpu()
    want_in_rank = torch.stack([(owner == d).any(dim=1) for d in range(R)], dim=1)
    hosts, per = buf._elastic.get_physical_domain_size()
    if hosts == 1:
        assert per_host is None
    else:
        want_host = want_in_rank.view(-1, hosts, per).any(dim=2).sum(0).to(torch.int32)
        assert_bitwise_equal("num_tokens_per_rdma_rank", per_host, want_host, where)
    assert_bitwise_equal("is_token_in_rank", in_rank, want_in_rank, where)
    assert_bitwise_equal("num_tokens_per_rank", per_rank, want_in_rank.sum(0).to(torch.int32), where)
    want_expert = torch.bincount(topk[topk >= 0].cpu(), minlength=E).to(torch.int32)
    assert_bitwise_equal("num_tokens_per_expert", per_expert, want_expert, where)

    def topk_of(s):  # the routing the reference sees: the stand-in expert per rank without top-k
        t = ins[s][1]
        if case.with_topk:
            return t
        own = torch.where(t >= 0, t // L, -1)
        return torch.stack([torch.where((own == d).any(dim=1), d * L, -1) for d in range(R)], dim=1)

    xs = [i[0] for i in ins]
    sfs = None
    x_arg = x
    if case.fp8:
        pairs = [_fp8(i[0]) for i in ins]
        xs, sfs = [p[0] for p in pairs], [p[1] for p in pairs]
        x_arg = tuple(t.to(dev) for t in _fp8(ins[r][0]))
    ws = [i[2] for i in ins] if case.with_topk else None
    refs = [reference.dispatch(d, xs, [topk_of(s) for s in range(R)], ws, E, T_REF, sfs) for d in range(R)]
    ref = refs[r]

    def call_kw():
        kw = dict(async_finish=case.async_mode)
        if case.previous_event:
            kw.update(previous_event=buf.capture(), allocate_on_comm_stream=case.async_mode)
        return kw

    def done(event):
        if case.async_mode:
            event.current_stream_wait()

    args = dict(x=x_arg, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                num_tokens_per_rdma_rank=per_host)
    if case.with_topk:
        args.update(topk_idx=topk, topk_weights=w)
    recv_x, recv_topk, recv_w, counts, handle, event = buf.dispatch(**args, **call_kw())
    done(event)
    M = ref.recv_x.shape[0]
    if case.fp8:
        assert_bitwise_equal("recv_x (fp8)", recv_x[0], ref.recv_x, where)
        assert_bitwise_equal("recv_x scales", recv_x[1], ref.recv_sf, where)
    else:
        assert_bitwise_equal("recv_x", recv_x, ref.recv_x, where)
    if hosts == 1:
        rank_prefix, _, _, src_idx, handle_in_rank, _ = handle
        ends = rank_prefix[:, r]
    else:  # V1's internode tuple
        handle_in_rank, _, _, _, from_rail, _, ends, src_idx, _, _ = handle
        rail = torch.stack([want_in_rank_of(ins, s, L, r // per, per) for s in range(r % per, R, per)])
        assert_bitwise_equal("recv_rdma_rank_prefix_sum", from_rail.long(), rail.cumsum(0), where)
    assert_bitwise_equal("rank_prefix_matrix[:, rank]", ends.long(), ref.num_recv_tokens_per_source.cumsum(0), where)
    assert_bitwise_equal("recv_src_idx", src_idx.long(), ref.recv_src_idx % T_REF, where)
    assert handle_in_rank is in_rank
    aligned = [int(c) for c in ref.num_recv_tokens_per_expert]
    if case.with_topk:
        assert_bitwise_equal("recv_topk_idx", recv_topk, ref.recv_topk_idx, where)
        zeroed = torch.where(ref.recv_topk_idx >= 0, ref.recv_topk_weights, 0.0)
        assert_bitwise_equal("recv_topk_weights (others' slots zero)", recv_w, zeroed, where)
    else:
        assert recv_topk is None and recv_w is None
        # without top-k the list counts what the sources announced for this rank's experts
        aligned = [sum(int((ins[s][1] == r * L + e).sum()) for s in range(R)) for e in range(L)]
    assert counts == aligned, where + f"num_recv_tokens_per_expert_list {counts} != {aligned}"

    if case.worst and case.with_topk and max(case.num_tokens) > 0:  # (num_worst_tokens=0 is no worst case)
        W = max(case.num_tokens) * R
        wx, wtopk, ww, empty, _, event = buf.dispatch(**args, num_worst_tokens=W, **call_kw())
        done(event)
        assert empty == [] and wtopk.shape[0] == W and ww.shape[0] == W
        got_x = wx[0] if case.fp8 else wx
        assert got_x.shape[0] == W
        assert_bitwise_equal("worst recv_x prefix", got_x[:M], ref.recv_x, where)
        assert_bitwise_equal("worst recv_topk_idx prefix", wtopk[:M], recv_topk, where)
        assert_bitwise_equal("worst recv_topk_weights prefix", ww[:M], recv_w, where)
        assert bool((wtopk[M:] == -1).all()), where + "padding rows must have recv_topk_idx = -1"

    # cached dispatch of new data: the same rows
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed + 99 + r)).to(torch.bfloat16)
    x2_arg = tuple(t.to(dev) for t in _fp8(x2)) if case.fp8 else x2.to(dev)
    cx, none1, none2, none3, none4, event = buf.dispatch(x2_arg, handle=handle, **call_kw())
    done(event)
    assert none1 is none2 is none3 is none4 is None
    x2s = [torch.randn(ins[s][0].shape, generator=torch.Generator().manual_seed(case.seed + 99 + s))
           .to(torch.bfloat16) for s in range(R)]
    if case.fp8:
        x2s = [_fp8(t)[0] for t in x2s]
    ref2 = reference.dispatch(r, x2s, [topk_of(s) for s in range(R)], None, E, T_REF)
    assert_bitwise_equal("cached recv_x", cx[0] if case.fp8 else cx, ref2.recv_x, where)

    # combine: expert outputs and weights that differ in every slot (V1 sums whole rows)
    def y_of(d):
        rx = refs[d].recv_x.float() if not case.fp8 else refs[d].recv_x.float() * 1.0
        return combine_input(rx.to(torch.bfloat16), d)

    def w_of(d):
        zeroed = torch.where(refs[d].recv_topk_idx >= 0, refs[d].recv_topk_weights, 0.0)
        return zeroed + torch.where(refs[d].recv_topk_idx >= 0, 0.0, 0.25 * (d + 1))

    bias = tuple(torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed + 7 + i + 10 * r))
                 .to(torch.bfloat16) for i in range(case.num_bias))
    w_back = w_of(r).to(dev) if case.with_topk else None
    out, out_w, event = buf.combine(y_of(r).to(dev), handle, topk_weights=w_back,
                                    bias=tuple(b.to(dev) for b in bias) or None, **call_kw())
    done(event)
    ref_out, ref_w = reference.combine(r, [y_of(d) for d in range(R)], [d.recv_src_idx for d in refs], topk_of(r),
                                       E, T_REF, [w_of(d) for d in range(R)] if case.with_topk else None, bias,
                                       sum_weights=True)
    assert_bitwise_equal("combined_x", out, ref_out, where)
    if case.with_topk:
        assert_bitwise_equal("combined_topk_weights (summed rows)", out_w, ref_w, where)
    else:
        assert out_w is None
    return dict(rows=M)
