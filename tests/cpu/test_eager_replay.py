"""Replayed eager calls (tritonep.eager) on CPU ranks, end to end: the real dispatch and combine
record their launches, and replays of those plans, run by the interpreter, give what the full path
gives, bit for bit, with fresh inputs every call (cached dispatch, combine, fresh dispatch without
CPU sync and a combine with its handle).

On GPUs a plan launches compiled kernels with addresses; here a stand-in for the compiled kernel
turns each address back into a tensor of the recorded dtype (over the storage that holds it) and
runs the interpreted kernel. Everything else (keys, recording, address mapping, allocations,
rebuilt handles) is the code the GPUs run."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from tritonep import recording
from tritonep.handle import EventOverlap
from tritonep.testing.launch import parallel_launch

_LIVE: list = []  # tensors whose storages a replayed address may point into


class _Interpreted:
    function = packed_metadata = None

    def __init__(self, kernel, kwargs, dtypes):
        self.kernel, self.kwargs, self.dtypes = kernel, kwargs, dtypes

    def run(self, grid, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
        call = [a if dtype is None else _tensor_at(a, dtype) for a, dtype in zip(args, self.dtypes)]
        with _disable_current_modes():
            self.kernel[(grid,)](*call, **self.kwargs)


def _tensor_at(addr: int, dtype) -> torch.Tensor:
    for t in _LIVE:
        storage = t.untyped_storage()
        lo = storage.data_ptr()
        if lo <= addr < lo + storage.nbytes():
            size = torch.tensor([], dtype=dtype).element_size()
            view = torch.empty(0, dtype=dtype)
            view.set_(storage, (addr - lo) // size, ((lo + storage.nbytes() - addr) // size,), (1,))
            return view
    raise AssertionError(f"address {addr:#x} is in no live tensor")


class _Allocations(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("empty", "empty_strided"):
            _LIVE.append(out)
        return out


def _interpreted_launches():
    """Every launch runs the interpreter and, while recording, writes itself down as GPUs do."""
    from tritonep.kernels import launch

    def call(self, grid, *args, **kwargs):
        with _disable_current_modes():
            self.kernel[(grid,)](*args, **kwargs)
        if recording.active is not None:
            dtypes = [a.dtype if isinstance(a, torch.Tensor) else None for a in args]
            recording.active.add(_Interpreted(self.kernel, kwargs, dtypes), grid, args, ())

    launch.Launcher.__call__ = call


_REPLAYS = [0, 0]  # replays, those given a view not made yet (a replayed handle's)


def _cpu_replay(self, plan, inputs, async_op, on_comm, rows=None, lazy_from=None):
    from tritonep.replay import LazyView

    _LIVE.extend(t.base if type(t) is LazyView else t for t in (*inputs, *plan.keep)
                 if isinstance(t, (torch.Tensor, LazyView)))
    _REPLAYS[0] += 1
    _REPLAYS[1] += any(type(t) is LazyView for t in inputs)
    with _Allocations():
        outs, host = plan.run(inputs, 0, rows, lazy_from)
    return outs, EventOverlap(None), host


def _worker(info):
    from tritonep import ElasticBuffer, eager
    from tritonep.testing.ep_check import assert_bitwise_equal
    from tritonep.testing.gate import make_topk

    _interpreted_launches()
    eager.EagerMixin._replay = _cpu_replay
    rank, (H, E, K, n) = info.rank, (256, 16, 4, 24 - 5 * info.rank)
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=24, hidden=H, num_topk=K, explicitly_destroy=True)
    assert buf._replay_synced and buf._share_plans  # (the defaults)
    buf._replay_synced = buf._share_plans = False  # per-handle plans first; synced ones once turned on
    g = torch.Generator().manual_seed(rank)
    topk = make_topk(3, rank, n, E, K)

    def rand(*shape, bf16=True):
        t = torch.randn(*shape, generator=g)
        return t.to(torch.bfloat16) if bf16 else t

    _, _, _, handle, _ = buf.dispatch(rand(n, H), topk_idx=topk, topk_weights=rand(n, K, bf16=False), num_experts=E)
    buf._replays = True
    for _ in range(3):
        buf.dispatch(rand(n, H), topk_idx=topk, num_experts=E)
    assert not buf._fresh_plans  # _replay_synced off: synced dispatches take the full path
    buf._replay_synced = True
    replayed, rows = 0, set()
    for i in range(4):  # (the first call of a kind is not recorded, the second is, the third replays)
        x, w, y, bias = rand(n, H), rand(n, K, bf16=False), rand(handle.num_recv_tokens, H), rand(n, H)
        routed = make_topk(10 + i, rank, n, E, K)  # new routing: a synced replay gets other counts
        calls = {"cached dispatch": lambda: buf.dispatch(x, handle=handle, topk_weights=w)[:3],
                 "combine": lambda: buf.combine(y, handle, bias=bias)[:2],
                 "fresh dispatch": lambda: buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E,
                                                        do_cpu_sync=False),
                 "synced dispatch": lambda: buf.dispatch(x, topk_idx=routed, topk_weights=w, num_experts=E,
                                                         expert_alignment=4)}
        for name, call in calls.items():
            buf._replays = False
            want = call()
            buf._replays = True
            got = call()
            where = f"[rank {rank} round {i} {name}] "
            if name in ("fresh dispatch", "synced dispatch"):
                hw, hg = want[3], got[3]
                for field in ("num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
                              "host_psum", "expert_alignment"):
                    assert getattr(hg, field) == getattr(hw, field), where + field
                M = int(hw.psum_num_recv_tokens_per_scaleup_rank[-1])
                if name == "synced dispatch":
                    rows.add(M)
                want, got = [t[:M] for t in want[:3]], [t[:M] for t in got[:3]]
                for field in eager.HANDLE_TENSORS:
                    a, b = getattr(hw, field), getattr(hg, field)
                    if field == "recv_src_metadata":
                        a, b = a[:M, :2], b[:M, :2]
                    assert_bitwise_equal(f"handle.{field}", b, a, where)
                yy = rand(hw.num_recv_tokens, H)
                buf._replays = False
                assert_bitwise_equal("combine with the replayed handle", buf.combine(yy, hg)[0],
                                     buf.combine(yy, hw)[0], where)
            for j, (a, b) in enumerate(zip(want, got)):
                if a is None:
                    assert b is None, where
                else:
                    assert_bitwise_equal(f"output {j}", b, a, where)
            replayed += i > 0
        _LIVE.clear()
    # a replayed synced dispatch still refuses a bad expert id on every rank, and the next call works
    bad = topk.clone()
    if rank == 0:
        bad[0, 0] = E + 5
    with pytest.raises(ValueError, match="expert id"):
        buf.dispatch(x, topk_idx=bad, topk_weights=w, num_experts=E, expert_alignment=4)
    buf._replays = False
    want = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E, expert_alignment=4)[0]
    buf._replays = True
    assert_bitwise_equal("after the refusal", buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E,
                                                           expert_alignment=4)[0], want, f"[rank {rank}] ")
    # a kind that cannot replay (a misaligned combine input is cloned: a torch operation) is
    # recorded on its second and third calls, then takes the full path without recording
    M = handle.num_recv_tokens
    for _ in range(5):
        buf.combine(rand(M * H + 1)[1:].view(M, H), handle)
    assert sorted(p for p in handle.plans.values() if type(p) is int) == [5], handle.plans
    plans = tuple(sum(type(p) is not int for p in d.values()) for d in (handle.plans, buf._fresh_plans))
    shared = _shared_plans(buf, topk, rand, n, H, E, K, rank)
    buf.destroy()
    return replayed, plans, rows, shared


def _shared_plans(buf, topk, rand, n, H, E, K, rank):
    """Plans shared between handles: every step a synced dispatch with new routing makes a new
    handle, whose cached dispatch and combine replay the plans of earlier handles' calls. From
    the third step the synced dispatch replays too: its handle's views are made on first use, and
    the shared plans read their addresses (the replays run before the full path touches them)."""
    from tritonep.eager import ReplayedHandle
    from tritonep.testing.ep_check import assert_bitwise_equal
    from tritonep.testing.gate import make_topk

    buf._share_plans = True
    before, lazy, lazy_inputs = _REPLAYS[0], 0, _REPLAYS[1]
    for step in range(4):
        routed = make_topk(60 + step, rank, n, E, K)
        buf._replays = True
        _, _, _, h, _ = buf.dispatch(rand(n, H), topk_idx=routed, num_experts=E)
        lazy += type(h) is ReplayedHandle
        x, w, bias = rand(n, H), rand(n, K, bf16=False), rand(n, H)
        y = rand(h.num_recv_tokens, H)
        calls = {"cached dispatch": lambda: buf.dispatch(x, handle=h, topk_weights=w)[:3],
                 "combine": lambda: buf.combine(y, h, bias=bias)[:2]}
        for name, call in calls.items():
            buf._replays = True
            got = call()
            buf._replays = False
            want = call()
            for j, (a, b) in enumerate(zip(want, got)):
                assert (a is None) == (b is None)
                if a is not None:
                    assert_bitwise_equal(f"output {j}", b, a, f"[rank {rank} shared step {step} {name}] ")
        _LIVE.clear()
    kinds = sum(type(p) is not int for p in buf._kind_plans.values())
    return kinds, _REPLAYS[0] - before, lazy, _REPLAYS[1] - lazy_inputs


def test_replayed_calls_equal_the_full_path():
    for replayed, plans, rows, shared in parallel_launch(2, _worker):
        # the synced plan was replayed with other counts than it recorded (outputs sized anew)
        assert replayed == 12 and plans == (2, 2) and len(rows) > 1, (replayed, plans, rows)
        # two kinds (cached dispatch, combine) shared by four handles: steps 3 and 4 replayed both,
        # and their synced dispatches, whose handles (views made on first use) the plans took: the
        # first replay of each such handle saw views not made yet (the full path after it made them)
        assert shared == (2, 6, 2, 2), shared
