"""Dispatch/combine checks against :mod:`tritonep.reference`, run inside each rank.

Every rank rebuilds every rank's inputs from seeds, so it can compute the reference for itself
without communication. All data checks are bitwise.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import reference
from ..buffer import ElasticBuffer
from ..layout import compute_layout
from .gate import combine_input, make_inputs


@dataclasses.dataclass
class Case:
    seed: int
    num_tokens: list  # tokens per rank (may contain 0)
    hidden: int
    num_experts: int
    num_topk: int
    routing: str = "uniform"
    masked_ratio: float = 0.0
    num_bias: int = 0
    fp8: bool = False
    expert_alignment: int = 1
    with_weights: bool = True
    cpu_sync: bool = True  # False: worst-case outputs, only the first psum[-1] rows are checked
    async_mode: bool = False  # async_with_compute_stream, then event.current_stream_wait()
    previous_event: bool = False  # pass buffer.capture() as previous_event (allocate_on_comm_stream)
    event_before_epilogue: bool = False  # pass buffer.capture() as previous_event_before_epilogue
    expand: bool = False  # do_expand=True: one row per (token, local expert)
    zero_padding: bool = False  # with expand: do_zero_padding=True
    sf_col_major: bool = False  # use_tma_aligned_col_major_sf
    quantize: bool = False  # bf16 in, FP8 out: needs a buffer built with use_fp8_dispatch=True
    round_scale: bool = False  # with quantize: power-of-two scales
    #: without cpu_sync: outputs of exactly the most rows any rank receives (num_max_recv_tokens)
    tight_capacity: bool = False


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.dtype.itemsize == 1:
        return t.view(torch.uint8)
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def assert_bitwise_equal(name: str, got: torch.Tensor, want: torch.Tensor, where: str = "") -> None:
    got_b, want_b = _bits(got), _bits(want)
    if got_b.shape != want_b.shape:
        raise AssertionError(f"{where}{name}: shape {tuple(got_b.shape)} != reference {tuple(want_b.shape)}")
    bad = (got_b != want_b)
    if bad.any():
        n = int(bad.sum())
        first = bad.nonzero()[0].tolist()
        # (the value shown from the copy compared, not a second copy: memory that changes between
        # two reads is what this message must describe)
        raise AssertionError(f"{where}{name}: {n} of {bad.numel()} elements differ from the reference; first at "
                             f"{first}: got {got_b.view(got.dtype)[tuple(first)].item()}, want "
                             f"{want.detach().cpu()[tuple(first)].item()}{_pattern(bad, got_b, got)}")


def _pattern(bad: torch.Tensor, got_b: torch.Tensor, got: torch.Tensor) -> str:
    """Where the differing elements lie: the rows, the column span, and whether they read zero
    (what a read that came before the write finds in memory that was zero), and where the span
    starts in memory (``got``: the checked tensor, on its device)."""
    if bad.dim() < 2:
        return ""
    rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
    cols = bad.flatten(1).any(0).nonzero().flatten()
    zero = bool((got_b[bad] == 0).all())
    shown = ", ".join(f"{r} ({int(bad[r].sum())})" for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    flat = bad.flatten().nonzero().flatten()
    a, b = int(flat[0]), int(flat[-1])
    size = got_b.element_size()
    # (whole 4 KiB pages of the host copy would point at the copy, not at the kernel; on the device,
    # a span that starts and ends on a page of its memory would point at the memory, not the kernel)
    page = (got_b.data_ptr() + a * size) % 4096 if got_b.is_contiguous() else -1
    text = (f"; rows (elements): {shown}; columns {int(cols.min())}..{int(cols.max())} of the flattened row; "
            f"{'all' if zero else 'not all'} of them zero; flat {a}..{b} "
            f"({'contiguous' if flat.numel() == b - a + 1 else 'with gaps'}, the first at byte {page} of a "
            f"4 KiB page of the host copy)")
    if got.device.type == "cuda" and got.is_contiguous():
        start, end = got.data_ptr() + a * size, got.data_ptr() + (b + 1) * size
        text += (f"; on the device bytes {start % (2 << 20)}..{end % (2 << 20)} (end excluded) of 2 MiB pages, "
                 f"the tensor at {got.data_ptr() % (2 << 20)}")
    return text


_MEMO: dict = {}


def _memo(case: Case, name: str, fn):
    """``fn()``, computed once per case: the GPU suite runs every case several times (twice to catch
    races, on two buffers in expand mode), and rebuilding the CPU reference dominated its run time.
    Only the latest case is kept."""
    key = repr(case)
    if _MEMO.get("case") != key:
        _MEMO.clear()
        _MEMO["case"] = key
    if name not in _MEMO:
        _MEMO[name] = fn()
    return _MEMO[name]


def build_inputs(case: Case, rank: int, salt: int = 0):
    x, topk, w = make_inputs(case.seed + salt, rank, case.num_tokens[rank], case.hidden, case.num_experts,
                             case.num_topk, case.routing, case.masked_ratio)
    if salt:  # cached dispatch: new data and weights, same routing
        _, topk, _ = make_inputs(case.seed, rank, case.num_tokens[rank], case.hidden, case.num_experts,
                                 case.num_topk, case.routing, case.masked_ratio)
        w = torch.where(topk >= 0, w, 0.0)
    sf = None
    if case.fp8:
        x, sf = reference.quantize_fp8(x)
    return x, sf, topk, w


def _prepare(buf: ElasticBuffer, case: Case) -> dict:
    """Every rank's inputs (rebuilt from seeds), the reference's view of them, and this rank's on its device."""
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    ins = _memo(case, f"ins{R}", lambda: [build_inputs(case, s) for s in range(R)])
    xs, sfs = _memo(case, f"xs{R}", lambda: _reference_inputs(case, ins))
    x, sf, topk, w = (t.to(dev) if t is not None else None for t in ins[r])
    return dict(R=R, r=r, dev=dev, T=max(max(case.num_tokens), 1), xs=xs, sfs=sfs,
                topks=[i[2] for i in ins], ws=[i[3] for i in ins], x=x, sf=sf, topk=topk, w=w,
                fp8_out=case.fp8 or case.quantize)


def _reference_inputs(case: Case, ins: list):
    """Every rank's ``(x, sf)`` as the receiver should see them: cast to FP8 when the dispatch quantizes."""
    if case.quantize:
        casts = [reference.quantize_fp8(i[0], case.round_scale) for i in ins]
        return [c[0] for c in casts], [c[1] for c in casts]
    return [i[0] for i in ins], [i[1] for i in ins]


def hybrid_scaleup(buf: ElasticBuffer):
    """The ranks per host of a buffer that runs hybrid mode (rows grouped by the source's scale-up
    index, the scale-up reduction level), else None (direct mode)."""
    return buf.num_scaleup_ranks if buf.num_scaleout_ranks > 1 else None


def run_case(buf: ElasticBuffer, case: Case, num_sms: int = 0) -> dict:
    """Dispatch, combine and cached dispatch of ``case`` on ``buf``; raises AssertionError on any mismatch."""
    if case.expand:
        return run_expand_case(buf, case, num_sms)
    p = _prepare(buf, case)
    R, r, dev, T, xs, sfs, topks, ws = (p[k] for k in ("R", "r", "dev", "T", "xs", "sfs", "topks", "ws"))
    x, sf, topk, w, fp8_out = p["x"], p["sf"], p["topk"], p["w"], p["fp8_out"]
    where = f"[rank {r}/{R} {case}] "
    x_arg = (x, sf) if case.fp8 else x
    w_arg = w if case.with_weights else None

    def stream_kw(dispatch: bool = True):
        kw = dict(num_sms=num_sms, async_with_compute_stream=case.async_mode)
        if case.quantize and dispatch:
            kw.update(round_scale=case.round_scale)
        if case.previous_event:
            kw.update(previous_event=buf.capture(), allocate_on_comm_stream=True)
        if case.event_before_epilogue:
            kw.update(previous_event_before_epilogue=buf.capture())
        return kw

    def done(event):
        if case.async_mode:
            event.current_stream_wait()

    U = hybrid_scaleup(buf)
    refs = _memo(case, f"refs{U}", lambda: [reference.dispatch(d, xs, topks, ws if case.with_weights else None,
                                                               case.num_experts, T, sfs if fp8_out else None, U)
                                            for d in range(R)])
    ref = refs[r]
    worst, cap_kw = _capacity(case, [d.recv_x.shape[0] for d in refs], R * T)
    stats = torch.zeros(case.num_experts // R, dtype=torch.int32, device=dev)
    t0 = time.perf_counter()
    recv_x, recv_topk, recv_w, handle, event = buf.dispatch(
        x_arg, topk_idx=topk, topk_weights=w_arg, num_experts=case.num_experts, num_max_tokens_per_rank=T,
        expert_alignment=case.expert_alignment, do_cpu_sync=case.cpu_sync,
        cumulative_local_expert_recv_stats=stats, **cap_kw, **stream_kw())
    done(event)
    t_dispatch = time.perf_counter() - t0
    M = int(handle.psum_num_recv_tokens_per_scaleup_rank[-1]) if R else 0
    rows = M if case.cpu_sync else worst
    assert handle.num_recv_tokens == rows, where + f"num_recv_tokens {handle.num_recv_tokens} != {rows}"
    if not case.cpu_sync:  # compare the valid prefix; the rest of the worst-case rows is unspecified
        recv_x = tuple(t[:M] for t in recv_x) if fp8_out else recv_x[:M]
        recv_topk = recv_topk[:M]
        recv_w = recv_w[:M] if recv_w is not None else None
    if fp8_out:
        recv_x, recv_sf = recv_x
        assert_bitwise_equal("recv_x (fp8)", recv_x, ref.recv_x, where)
        assert_bitwise_equal("recv_x scales", recv_sf, ref.recv_sf, where)
    else:
        assert_bitwise_equal("recv_x", recv_x, ref.recv_x, where)
    assert_bitwise_equal("recv_topk_idx", recv_topk, ref.recv_topk_idx, where)
    if case.with_weights:
        assert_bitwise_equal("recv_topk_weights", recv_w, ref.recv_topk_weights, where)
    else:
        assert recv_w is None, where + "recv_topk_weights should be None without weights"
    assert_bitwise_equal("recv_src_metadata[:, 0]", handle.recv_src_metadata[:M, 0].long(), ref.recv_src_idx, where)
    A = case.expert_alignment
    aligned = [(c + A - 1) // A * A for c in ref.num_recv_tokens_per_expert.tolist()]
    assert handle.num_recv_tokens_per_expert_list == (aligned if case.cpu_sync else []), \
        where + "num_recv_tokens_per_expert_list"
    # DeepEP computes num_expanded_tokens whatever do_expand is: exact when synced, else the worst case
    L, kk = case.num_experts // R, case.num_topk
    want_exp = sum(aligned) if case.cpu_sync else -(-(R * T * min(kk, L) + (A - 1) * L) // A) * A
    assert handle.num_expanded_tokens == want_exp, where + f"num_expanded_tokens {handle.num_expanded_tokens}"
    assert_bitwise_equal("cumulative_local_expert_recv_stats", stats.long(), ref.num_recv_tokens_per_expert, where)
    assert_bitwise_equal("num_unaligned_recv_tokens_per_expert", handle.num_unaligned_recv_tokens_per_expert.long(),
                         ref.num_recv_tokens_per_expert, where)
    assert_bitwise_equal("psum_num_recv_tokens_per_expert", handle.psum_num_recv_tokens_per_expert.long(),
                         torch.tensor(aligned, dtype=torch.int64).cumsum(0), where)
    per_source = ref.num_recv_tokens_per_source
    per_group = per_source.view(-1, U).sum(0) if U else per_source  # hybrid: by the source's scale-up index
    assert_bitwise_equal("psum_num_recv_tokens_per_scaleup_rank",
                         handle.psum_num_recv_tokens_per_scaleup_rank.long(), per_group.cumsum(0), where)
    # the handle keeps its own copy of the ids (do_handle_copy defaults to True), bit for bit
    assert_bitwise_equal("handle.topk_idx", handle.topk_idx, topk, where)
    assert handle.topk_idx.data_ptr() != topk.data_ptr() or topk.numel() == 0, where + "handle.topk_idx is not a copy"
    # the routing layout the backend computed (on the device for the symmetric backend)
    want = compute_layout(topk.cpu(), case.num_experts, R, r, T)
    for name in ("dst_buffer_slot_idx", "combine_slot_idx", "send_counts"):
        assert_bitwise_equal(f"handle.{name}", getattr(handle, name), getattr(want, name), where)

    # combine: every rank's "expert output" is a function of what it received, so any rank can rebuild it
    ys = _memo(case, f"ys{U}", lambda: [combine_input(refs[d].recv_x, d) for d in range(R)])
    g = torch.Generator().manual_seed(case.seed * 7 + r)
    bias = tuple(torch.randn(case.num_tokens[r], case.hidden, generator=g).to(torch.bfloat16)
                 for _ in range(case.num_bias))
    y = ys[r].to(dev)
    w_back = recv_w
    if not case.cpu_sync:  # combine takes the worst-case rows; rows past M must be ignored
        y = torch.cat([y, torch.full((rows - M, case.hidden), float("nan"), dtype=y.dtype, device=dev)])
        if recv_w is not None:
            w_back = torch.cat([recv_w, torch.full((rows - M, case.num_topk), float("nan"), device=dev)])
    t0 = time.perf_counter()
    out, out_w, event = buf.combine(y, handle, topk_weights=w_back,
                                    bias=tuple(b.to(dev) for b in bias) if bias else None, **stream_kw(False))
    done(event)
    t_combine = time.perf_counter() - t0
    amr = buf.allow_multiple_reduction
    ref_out, ref_w = _memo(case, f"combined{U}{amr}", lambda: reference.combine(
        r, ys, [d.recv_src_idx for d in refs], topk, case.num_experts, T,
        [d.recv_topk_weights for d in refs] if case.with_weights else None, bias, U if amr else None))
    assert_bitwise_equal("combined_x", out, ref_out, where)
    if case.with_weights:
        assert_bitwise_equal("combined_topk_weights", out_w, ref_w, where)
        assert_bitwise_equal("combined_topk_weights vs dispatched weights", out_w, w, where)

    # cached dispatch: new data and weights, same routing -> same rows as a fresh reference
    ins2 = _memo(case, "ins2", lambda: [build_inputs(case, s, salt=1) for s in range(R)])
    x2, sf2, _, w2 = (t.to(dev) if t is not None else None for t in ins2[r])
    recv_x2, recv_topk2, recv_w2, handle2, event = buf.dispatch(
        (x2, sf2) if case.fp8 else x2, handle=handle, topk_weights=w2 if case.with_weights else None,
        **stream_kw())
    done(event)
    assert handle2 is handle, where + "cached dispatch must return the same handle"
    recv_x2 = tuple(t[:M] for t in recv_x2) if fp8_out else recv_x2[:M]
    recv_topk2 = recv_topk2[:M]
    recv_w2 = recv_w2[:M] if recv_w2 is not None else None
    xs2, sfs2 = _memo(case, "xs2", lambda: _reference_inputs(case, ins2))
    ref2 = _memo(case, f"ref2{U}", lambda: reference.dispatch(
        r, xs2, [i[2] for i in ins2], [i[3] for i in ins2] if case.with_weights else None, case.num_experts, T,
        sfs2 if fp8_out else None, U))
    if fp8_out:
        recv_x2, recv_sf2 = recv_x2
        assert_bitwise_equal("cached recv_x scales", recv_sf2, ref2.recv_sf, where)
    assert_bitwise_equal("cached recv_x", recv_x2, ref2.recv_x, where)
    assert_bitwise_equal("cached recv_topk_idx", recv_topk2, ref.recv_topk_idx, where)
    if case.with_weights:
        assert_bitwise_equal("cached recv_topk_weights", recv_w2, ref2.recv_topk_weights, where)
    return {"num_recv_tokens": handle.num_recv_tokens, "t_dispatch": t_dispatch, "t_combine": t_combine}


def _capacity(case: Case, rows: list, worst: int) -> tuple:
    """``(output rows without a host sync, dispatch keywords)``: with ``case.tight_capacity``,
    ``num_max_recv_tokens`` = the most of ``rows`` (each rank's rows, from the reference)."""
    if not case.tight_capacity or case.cpu_sync:
        return worst, {}
    cap = max(1, max(rows))
    return min(cap, worst), dict(num_max_recv_tokens=cap)


def random_cases(seed: int, num_ranks: int, count: int, hiddens=(128, 256), max_tokens: int = 24) -> list:
    """``count`` configurations sampled with a fixed seed from the cross product of the options that
    DeepEP's own test sweeps (FP8 input, expert alignment, expand, CPU sync, bias count, async) and
    routing shapes (empty ranks, -1 slots, skewed and one-expert routing); a third of the cases
    without CPU sync have outputs of the tightest ``num_max_recv_tokens``. Cached dispatch runs in
    every case."""
    import itertools

    options = list(itertools.product(
        (False, True),  # fp8 input
        (1, 128),  # expert_alignment
        (False, True),  # expand
        (True, False),  # cpu_sync
        (0, 1, 2),  # num_bias
        (False, True),  # async (with previous events)
    ))
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(options), generator=g)[:count].tolist()
    cases = []
    for i, pick in enumerate(picks):
        fp8, align, expand, cpu_sync, num_bias, async_mode = options[pick]

        def choose(values):
            return values[int(torch.randint(len(values), (1,), generator=g))]
        L = choose([1, 2, 3, 4])
        E = L * num_ranks
        k = min(E, choose([1, 2, 4, 6, 8]))
        tokens = [int(torch.randint(0, max_tokens + 1, (1,), generator=g)) for _ in range(num_ranks)]
        if i % 3 == 0:
            tokens[i % num_ranks] = 0  # an empty rank
        cases.append(Case(seed=seed * 100 + i, num_tokens=tokens, hidden=choose(list(hiddens)), num_experts=E,
                          num_topk=k, routing=choose(["uniform", "uniform", "skewed", "one_expert"]),
                          masked_ratio=choose([0.0, 0.2, 0.5]), num_bias=num_bias, fp8=fp8, expert_alignment=align,
                          with_weights=(i % 5 != 4), cpu_sync=cpu_sync, async_mode=async_mode,
                          previous_event=async_mode and i % 2 == 0, event_before_epilogue=async_mode,
                          expand=expand, zero_padding=(i % 2 == 0), sf_col_major=fp8 and i % 2 == 1,
                          tight_capacity=not cpu_sync and i % 3 == 1))
    return cases


def run_expand_case(buf: ElasticBuffer, case: Case, num_sms: int = 0) -> dict:
    """``do_expand=True`` dispatch, combine of expanded rows (the buffer's ``allow_multiple_reduction``
    decides the reduction), and cached expanded dispatch, against :func:`reference.dispatch_expand`
    and :func:`reference.combine_expand`."""
    p = _prepare(buf, case)
    R, r, dev, T, xs, sfs, topks, ws = (p[k] for k in ("R", "r", "dev", "T", "xs", "sfs", "topks", "ws"))
    x, sf, topk, w, fp8_out = p["x"], p["sf"], p["topk"], p["w"], p["fp8_out"]
    amr = buf.allow_multiple_reduction
    where = f"[rank {r}/{R} amr={amr} {case}] "
    kw = dict(num_sms=num_sms, do_cpu_sync=case.cpu_sync, do_expand=True, do_zero_padding=case.zero_padding,
              use_tma_aligned_col_major_sf=case.sf_col_major, async_with_compute_stream=case.async_mode)
    if case.quantize:
        kw.update(round_scale=case.round_scale)
    U = hybrid_scaleup(buf)
    refs = _memo(case, f"refs_expand{U}", lambda: [
        reference.dispatch_expand(d, xs, topks, ws if case.with_weights else None, case.num_experts, T,
                                  case.expert_alignment, sfs if fp8_out else None, U) for d in range(R)])
    ref = refs[r]
    L, A = case.num_experts // R, case.expert_alignment
    worst, cap_kw = _capacity(case, [d.recv_x.shape[0] for d in refs],
                              -(-(R * T * min(case.num_topk, L) + (A - 1) * L) // A) * A)
    recv_x, recv_topk, recv_w, handle, event = buf.dispatch(
        (x, sf) if case.fp8 else x, topk_idx=topk, topk_weights=w if case.with_weights else None,
        num_experts=case.num_experts, num_max_tokens_per_rank=T, expert_alignment=case.expert_alignment, **cap_kw,
        **kw)
    if case.async_mode:
        event.current_stream_wait()
    M = ref.base.recv_x.shape[0]
    M_exp = ref.recv_x.shape[0]
    assert recv_topk is None, where + "expand mode returns no recv_topk_idx"
    if case.cpu_sync:
        assert handle.num_expanded_tokens == M_exp, where + f"num_expanded_tokens {handle.num_expanded_tokens} != {M_exp}"
    else:
        assert handle.num_expanded_tokens == worst, where + f"num_expanded_tokens {handle.num_expanded_tokens} != {worst}"
    assert handle.num_expanded_tokens >= M_exp and handle.do_expand
    recv_sf = None
    if fp8_out:
        recv_x, recv_sf = recv_x
        if case.sf_col_major:
            assert recv_sf.stride() == (1, (recv_sf.shape[0] + 3) // 4 * 4), where + f"sf strides {recv_sf.stride()}"
    rows = ref.valid.nonzero().flatten() if not case.zero_padding else torch.arange(M_exp)
    assert_bitwise_equal("expanded recv_x", recv_x[:M_exp].cpu()[rows], ref.recv_x[rows], where)
    if fp8_out:
        assert_bitwise_equal("expanded scales", recv_sf[:M_exp].cpu()[rows], ref.recv_sf[rows], where)
    if case.with_weights:
        assert_bitwise_equal("expanded weights", recv_w[:M_exp].cpu()[rows], ref.recv_topk_weights[rows], where)
    assert_bitwise_equal("recv_src_metadata[:, 0]", handle.recv_src_metadata[:M, 0].long(), ref.base.recv_src_idx,
                         where)
    assert_bitwise_equal("recv_src_metadata[:, 2:]", handle.recv_src_metadata[:M, 2:].long(), ref.positions, where)
    assert_bitwise_equal("psum_num_recv_tokens_per_expert (expand)", handle.psum_num_recv_tokens_per_expert.long(),
                         ref.psum, where)

    ys = _memo(case, f"ys_expand{U}", lambda: [combine_input(d.recv_x, dd) for dd, d in enumerate(refs)])
    y = ys[r].to(dev)
    if handle.num_expanded_tokens > M_exp:
        y = torch.cat([y, torch.full((handle.num_expanded_tokens - M_exp, case.hidden), float("nan"),
                                     dtype=y.dtype, device=dev)])
    g = torch.Generator().manual_seed(case.seed * 7 + r)
    bias = tuple(torch.randn(case.num_tokens[r], case.hidden, generator=g).to(torch.bfloat16)
                 for _ in range(case.num_bias))
    use_w = case.with_weights and amr
    out, out_w, event = buf.combine(y, handle, topk_weights=recv_w if use_w else None,
                                    bias=tuple(b.to(dev) for b in bias) if bias else None, num_sms=num_sms,
                                    async_with_compute_stream=case.async_mode)
    if case.async_mode:
        event.current_stream_wait()
    ref_out, ref_w = _memo(case, f"combined_expand_{amr}{U}", lambda: reference.combine_expand(
        r, ys, [d.positions for d in refs], [d.base.recv_src_idx for d in refs], topk, case.num_experts, T, amr,
        [d.recv_topk_weights for d in refs] if use_w else None, bias, U))
    assert_bitwise_equal("combined_x (expand)", out, ref_out, where)
    if use_w:
        assert_bitwise_equal("combined_topk_weights (expand)", out_w, ref_w, where)

    ins2 = _memo(case, "ins2", lambda: [build_inputs(case, s, salt=1) for s in range(R)])
    x2, sf2, _, w2 = (t.to(dev) if t is not None else None for t in ins2[r])
    kw.pop("do_cpu_sync")
    recv_x2, _, recv_w2, handle2, event = buf.dispatch((x2, sf2) if case.fp8 else x2, handle=handle,
                                                       topk_weights=w2 if case.with_weights else None, **kw)
    if case.async_mode:
        event.current_stream_wait()
    xs2, sfs2 = _memo(case, "xs2", lambda: _reference_inputs(case, ins2))
    ref2 = _memo(case, f"ref2_expand{U}", lambda: reference.dispatch_expand(
        r, xs2, [i[2] for i in ins2], [i[3] for i in ins2] if case.with_weights else None, case.num_experts, T,
        case.expert_alignment, sfs2 if fp8_out else None, U))
    if fp8_out:
        recv_x2, recv_sf2 = recv_x2
        assert_bitwise_equal("cached expanded scales", recv_sf2[:M_exp].cpu()[rows], ref2.recv_sf[rows], where)
    assert_bitwise_equal("cached expanded recv_x", recv_x2[:M_exp].cpu()[rows], ref2.recv_x[rows], where)
    if case.with_weights:
        assert_bitwise_equal("cached expanded weights", recv_w2[:M_exp].cpu()[rows], ref2.recv_topk_weights[rows],
                             where)
    return {"num_recv_tokens": M, "num_expanded_tokens": M_exp}
