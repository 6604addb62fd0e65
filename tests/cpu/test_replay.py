"""tritonep.replay: a recorded call becomes a plan that launches the same kernels with the new
inputs' and outputs' addresses, and a call that did anything else gets no plan. A fake compiled
kernel stands in for Triton's (CPU ranks compile nothing); the GPU suite replays real calls
(tests/gpu: test_cached_calls_replay)."""
import torch

from tritonep import recording, replay
from tritonep.kernels.launch import Launcher

from test_launch import _FakeKernel


def _call(go, x, w, state):
    """What a backend call does: allocate outputs, view them, launch twice."""
    out = torch.empty(4, 8, dtype=torch.float32)
    out_w = torch.empty(4, dtype=torch.float32)
    go(2, x.view(torch.int32), state, 3, BT=16)
    go(3, out.view(torch.int32), w[1:], 5, BT=16)  # an offset into an input
    go(1, out_w, state[2:], 5, BT=16)
    return out, out_w


def _recorded(go, x, w, state, extra=None):
    with replay.record() as r:
        outs = _call(go, x, w, state)
        if extra is not None:
            extra()
    return r, outs


def test_plan_substitutes_addresses_and_keeps_the_rest():
    k = _FakeKernel()
    go = Launcher(k, fast=True)
    state = torch.zeros(16, dtype=torch.int32)
    x, w = torch.randn(4, 8), torch.randn(6)
    _call(go, x, w, state)  # compiles (fake): later calls take the compiled path
    r, outs = _recorded(go, x, w, state)
    plan = replay.build(r, (x, w), outs, torch.device("cpu"))
    assert isinstance(plan, replay.Plan), plan
    k.compiled.calls.clear()
    x2, w2 = torch.randn(4, 8), torch.randn(6)
    (out2, out_w2), host = plan.run((x2, w2), stream=0)
    assert host is None
    assert out2.shape == (4, 8) and out2.dtype == torch.float32 and out_w2.shape == (4,)
    assert [c[1][:3] for c in k.compiled.calls] == [
        (x2.data_ptr(), state.data_ptr(), 3),
        (out2.data_ptr(), w2.data_ptr() + 4, 5),
        (out_w2.data_ptr(), state.data_ptr() + 8, 5)]
    assert [c[0] for c in k.compiled.calls] == [(2, 1, 1), (3, 1, 1), (1, 1, 1)]
    assert any(t is state or t.data_ptr() == state.data_ptr() for t in plan.keep)


def test_other_gpu_work_or_torch_ops_leave_no_plan():
    go = Launcher(_FakeKernel(), fast=True)
    state = torch.zeros(16, dtype=torch.int32)
    x, w = torch.randn(4, 8), torch.randn(6)
    _call(go, x, w, state)
    r, outs = _recorded(go, x, w, state, extra=lambda: x + 1)
    assert replay.build(r, (x, w), outs, torch.device("cpu")) == "torch operation add"
    r, outs = _recorded(go, x, w, state, extra=lambda: recording.taint("copy-engine copy"))
    assert replay.build(r, (x, w), outs, torch.device("cpu")) == "copy-engine copy"
    r, outs = _recorded(go, x, x.view(-1)[:6], state)  # inputs that overlap
    assert replay.build(r, (x, x.view(-1)[:6]), outs, torch.device("cpu")) == "inputs or allocations overlap in memory"
    r, outs = _recorded(go, x, w, state)  # a result that views an input
    assert replay.build(r, (x, w), (x[1:],), torch.device("cpu")) == "a result is a view that cannot be rebuilt"


def test_temporaries_are_allocated_anew_and_views_rebuilt():
    k = _FakeKernel()
    go = Launcher(k, fast=True)
    x, w = torch.randn(4, 8), torch.randn(6)
    with replay.record() as r:  # a scratch tensor the call allocates, and results that view it
        tmp = torch.empty(16, dtype=torch.int32)
        outs = _call(go, x, w, tmp)
    persistent = torch.zeros(3)
    plan = replay.build(r, (x, w), (*outs, tmp[2:].view(torch.float32).view(2, 7), w, persistent, None),
                        torch.device("cpu"))
    assert isinstance(plan, replay.Plan), plan
    k.compiled.calls.clear()
    x2, w2 = torch.randn(4, 8), torch.randn(6)
    (out2, out_w2, view2, w_back, same, none), _ = plan.run((x2, w2), stream=0)
    new_tmp = k.compiled.calls[0][1][1]
    assert new_tmp not in (tmp.data_ptr(), 0) and k.compiled.calls[2][1][1] == new_tmp + 8
    assert view2.shape == (2, 7) and view2.dtype == torch.float32 and view2.data_ptr() == new_tmp + 8
    assert w_back is w2 and same is persistent and none is None


def test_a_launch_through_triton_taints_and_recordings_do_not_nest():
    import pytest

    slow = Launcher(_FakeKernel(), fast=False)
    x = torch.zeros(4)
    with replay.record() as r:
        slow(1, x, 1, 1, BT=16)
    assert r.rec.tainted and "through Triton" in r.rec.tainted
    with replay.record():
        with pytest.raises(RuntimeError, match="already in progress"):
            replay.record().__enter__()
    assert recording.active is None


def test_offsets_from_addresses_are_recomputed():
    # the combine kernels read the caller's rows through the heap's pointer: (x - heap) // 2
    k = _FakeKernel()
    go = Launcher(k, fast=True)
    heap, x = torch.zeros(64), torch.randn(4, 8)
    go(1, heap, heap, recording.Offset.between(x, heap, 4), BT=16)
    with replay.record() as r:
        go(1, heap, heap, recording.Offset.between(x, heap, 4), BT=16)
    plan = replay.build(r, (x,), (), torch.device("cpu"))
    x2 = torch.randn(4, 8)
    k.compiled.calls.clear()
    plan.run((x2,), stream=0)
    assert k.compiled.calls[0][1][2] == (x2.data_ptr() - heap.data_ptr()) // 4


def test_plans_write_new_addresses_into_parameter_buffers(monkeypatch):
    from tritonep.kernels import launch

    from test_launch import _FakeDriver, _packable

    driver = _FakeDriver([8, 8, 8, 8, 8])
    monkeypatch.setattr(launch, "_driver", driver)
    k = _FakeKernel()
    c = _packable(k)
    c.src.signature = {"a": "*i32", "b": "*i32", "n": "i64", "BT": "constexpr", "BK": "constexpr"}
    go = Launcher(k, fast=True, packed=False)
    state = torch.zeros(16, dtype=torch.int32)
    x, w = torch.randn(4, 8), torch.randn(6)
    _call(go, x, w, state)
    r, outs = _recorded(go, x, w, state)
    plan = replay.build(r, (x, w), outs, torch.device("cpu"))
    k.compiled.calls.clear()
    x2, w2 = torch.randn(4, 8), torch.randn(6)
    (out2, out_w2), _ = plan.run((x2, w2), stream=9)
    assert not k.compiled.calls
    got = [(call[1], call[6], values[:3]) for call, values in driver.launches]
    assert got == [(2, 9, [x2.data_ptr(), state.data_ptr(), 3]),
                   (3, 9, [out2.data_ptr(), w2.data_ptr() + 4, 5]),
                   (1, 9, [out_w2.data_ptr(), state.data_ptr() + 8, 5])]


def test_offsets_reach_parameter_buffers(monkeypatch):
    # a replay through the parameter buffer writes the recomputed Offset into its slot too
    from tritonep.kernels import launch

    from test_launch import _FakeDriver, _packable

    driver = _FakeDriver([8, 8, 8, 8, 8])
    monkeypatch.setattr(launch, "_driver", driver)
    k = _FakeKernel()
    _packable(k).src.signature = {"a": "*i32", "b": "*i32", "n": "i64", "BT": "constexpr", "BK": "constexpr"}
    go = Launcher(k, fast=True, packed=False)
    heap, x = torch.zeros(64), torch.randn(4, 8)
    go(1, heap, heap, recording.Offset.between(x, heap, 4), BT=16)
    with replay.record() as r:
        go(1, heap, heap, recording.Offset.between(x, heap, 4), BT=16)
    plan = replay.build(r, (x,), (), torch.device("cpu"))
    through_triton = len(k.compiled.calls)
    for _ in range(2):
        x2 = torch.randn(4, 8)
        plan.run((x2,), stream=9)
        assert len(k.compiled.calls) == through_triton  # (straight to the driver)
        (_, grid, *_, stream), values = driver.launches[-1]
        assert (grid, stream) == (1, 9)
        assert values[:3] == [heap.data_ptr(), heap.data_ptr(), ((x2.data_ptr() - heap.data_ptr()) // 4) % 2**64]
