"""GPU check of replayed eager calls (:mod:`tritonep.eager`): cached dispatches and combines that
replay a handle's recorded launches give, bit for bit, what the full path gives for the same
inputs, with fresh random inputs every call, on the caller's stream, on another stream, and
overlapped on the comm stream; and the handle holds the plans (the calls did replay)."""
from __future__ import annotations

import torch

from .ep_check import assert_bitwise_equal
from .gate import make_topk


def _pair(buf, call):
    """``call()`` on the full path, then through the plans (recorded by the first such call)."""
    buf._replays = False
    want = call()
    buf._replays = True
    got = call()
    return want, got


def _tensors(out) -> list:
    flat = []
    for t in out:
        if isinstance(t, tuple):
            flat += list(t)
        elif isinstance(t, torch.Tensor) or t is None:
            flat.append(t)
    return flat


def _same(name: str, want, got, where: str) -> None:
    for i, (a, b) in enumerate(zip(_tensors(want), _tensors(got))):
        assert (a is None) == (b is None), f"{where}{name}[{i}]: one path returned None"
        if a is not None:
            assert_bitwise_equal(f"{name}[{i}]", b, a, where)


def _check_fresh(buf, topk, rand_x, rand_w, num_experts: int, hidden: int, rank: int, g, rounds: int,
                 cpu_sync: bool) -> int:
    """Fresh dispatches: the outputs' valid rows, the handle (its tensors' meaningful parts and its
    other fields), and a combine with each handle. Synced ones get new routing every round (the
    replay sizes its outputs by the new counts)."""
    from ..eager import HANDLE_TENSORS

    calls = 0
    for i in range(rounds):
        where = f"[rank {rank} fresh round {i}, cpu_sync={cpu_sync}] "
        x, w = rand_x(), rand_w()
        routed = make_topk(40 + i, rank, topk.shape[0], num_experts, topk.shape[1]).to(buf.device) if cpu_sync else topk

        def fresh():
            recv_x, recv_topk, recv_w, h, _ = buf.dispatch(x, topk_idx=routed, topk_weights=w,
                                                           num_experts=num_experts, do_cpu_sync=cpu_sync)
            M = int(h.psum_num_recv_tokens_per_scaleup_rank[-1])
            return recv_x[:M], recv_topk[:M], recv_w[:M], h

        want, got = _pair(buf, fresh)
        _same("fresh dispatch", want[:3], got[:3], where)
        hw, hg = want[3], got[3]
        assert hg is not hw and hg.plans is not hw.plans, where + "a replay must make a new handle"
        M = want[0].shape[0]
        for name in HANDLE_TENSORS:
            a, b = getattr(hw, name), getattr(hg, name)
            if name == "recv_src_metadata":  # rows past M and columns 2.. are unspecified
                a, b = a[:M, :2], b[:M, :2]
            assert_bitwise_equal(f"handle.{name}", b, a, where)
        for name in ("num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list", "do_expand",
                     "num_experts", "expert_alignment", "num_max_tokens_per_rank", "num_sms", "buffer_id",
                     "host_psum"):
            assert getattr(hg, name) == getattr(hw, name), where + f"handle.{name}"
        y = torch.randn(hw.num_recv_tokens, hidden, generator=g).to(torch.bfloat16).to(buf.device)
        outs = [buf.combine(y, h)[0] for h in (hw, hg)]
        assert_bitwise_equal("combine with the replayed handle", outs[1], outs[0], where)
        calls += 4
    return calls


def _check_shared(buf, topk, rand_x, rand_w, num_experts: int, hidden: int, rank: int, g, rounds: int) -> int:
    """Plans shared between handles (``_share_plans``): a synced dispatch with new routing every
    step makes a new handle, whose cached dispatch and combine replay earlier handles' plans."""
    before, buf._share_plans = buf._share_plans, True
    calls = 0
    for step in range(rounds):
        where = f"[rank {rank} shared step {step}] "
        routed = make_topk(80 + step, rank, topk.shape[0], num_experts, topk.shape[1]).to(buf.device)
        buf._replays = False
        _, _, _, h, _ = buf.dispatch(rand_x(), topk_idx=routed, num_experts=num_experts)
        x, w = rand_x(), rand_w()
        y = torch.randn(h.num_recv_tokens, hidden, generator=g).to(torch.bfloat16).to(buf.device)
        want, got = _pair(buf, lambda: buf.dispatch(x, handle=h, topk_weights=w)[:3])
        _same("cached dispatch", want, got, where)
        want, got = _pair(buf, lambda: buf.combine(y, h)[:2])
        _same("combine", want, got, where)
        calls += 4
    kinds = sum(type(p) is not int for p in buf._kind_plans.values())
    assert kinds >= 2, f"[rank {rank}] shared plans: {kinds}"
    buf._share_plans = before
    return calls


def run_replay_checks(buf, fp8_buf, num_tokens: int, hidden: int, num_experts: int, num_topk: int,
                      rounds: int = 4) -> dict:
    """Every rank of ``buf``'s group calls this; raises AssertionError on a mismatch."""
    import torch.distributed as dist

    rank = dist.get_rank(buf.group)
    for b in (buf, fp8_buf):  # per-handle plans first (counted below); _check_shared then shares them
        b._replay_synced, b._share_plans = True, False
    n = num_tokens - 3 * rank
    dev = buf.device
    g = torch.Generator(device="cpu").manual_seed(100 + rank)
    topk = make_topk(21, rank, n, num_experts, num_topk).to(dev)

    def rand_x():
        return torch.randn(n, hidden, generator=g).to(torch.bfloat16).to(dev)

    def rand_w():
        return torch.rand(n, num_topk, generator=g).to(dev)

    def rand_fp8():
        return (rand_x().to(torch.float8_e4m3fn), torch.rand(n, hidden // 128, generator=g).to(dev))

    kinds = (("bf16", buf, rand_x, {}), ("fp8 input", buf, rand_fp8, {}),
             ("expand", buf, rand_x, dict(do_expand=True)), ("fp8 cast", fp8_buf, rand_x, {}))
    handles = {}
    for name, b, make, kw in kinds:
        _, _, _, handles[name], _ = b.dispatch(make(), topk_idx=topk, topk_weights=rand_w(),
                                               num_experts=num_experts, **kw)
    side = torch.cuda.Stream(device=dev)
    calls = 0
    for i in range(rounds):
        for mode in ("caller", "side stream", "async"):
            where = f"[rank {rank} round {i} {mode}] "
            ctx = torch.cuda.stream(side) if mode == "side stream" else torch.cuda.stream(torch.cuda.current_stream())
            kw = dict(async_with_compute_stream=mode == "async")
            with ctx:
                for name, b, make, _ in kinds:
                    h = handles[name]
                    x_arg, w = make(), rand_w()

                    def dispatch():
                        out = b.dispatch(x_arg, handle=h, topk_weights=w, do_expand=h.do_expand, **kw)
                        if kw["async_with_compute_stream"]:
                            out[4].current_stream_wait()
                        return out[:3]

                    want, got = _pair(b, dispatch)
                    _same(f"cached dispatch ({name})", want, got, where)
                    rows = h.num_expanded_tokens if h.do_expand else h.num_recv_tokens
                    y = torch.randn(rows, hidden, generator=g).to(torch.bfloat16).to(dev)
                    bias = torch.randn(n, hidden, generator=g).to(torch.bfloat16).to(dev)
                    yw = None if h.do_expand else torch.rand(rows, num_topk, generator=g).to(dev)

                    def combine():
                        out = b.combine(y, h, topk_weights=yw, bias=bias, **kw)
                        if kw["async_with_compute_stream"]:
                            out[2].current_stream_wait()
                        return out[:2]

                    want, got = _pair(b, combine)
                    _same(f"combine ({name})", want, got, where)
                    calls += 2
            torch.cuda.current_stream().wait_stream(side)
    for cpu_sync in (False, True):
        calls += _check_fresh(buf, topk, rand_x, rand_w, num_experts, hidden, rank, g, rounds, cpu_sync)
    made = sum(type(p) is not int for p in buf._fresh_plans.values())
    assert made >= 2, f"[rank {rank}] the fresh dispatches left {made} plans"
    calls += _check_shared(buf, topk, rand_x, rand_w, num_experts, hidden, rank, g, rounds)
    torch.cuda.synchronize()
    plans = {name: sum(type(p) is not int for p in h.plans.values()) for name, h in handles.items()}
    # dispatch and combine, on the caller's stream (any stream) and asynchronous, FP8 input or not
    assert all(count >= 4 for count in plans.values()), f"[rank {rank}] too few plans: {plans}"
    return {"calls": calls, "plans": plans}


__all__ = ["run_replay_checks"]
