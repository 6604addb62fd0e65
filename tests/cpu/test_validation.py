"""Bad input raises before any communication and leaves the buffer usable; a missing rank ends
in a timeout error that names the ranks and the operation."""
import pytest
import torch

from tritonep import CommTimeoutError, KernelConfig, ElasticBuffer, topk_idx_t
from tritonep.testing.ep_check import Case, run_case
from tritonep.testing.launch import parallel_launch

T, H, E, K = 16, 128, 8, 2


def _expect(exc, fragment, fn):
    with pytest.raises(exc) as info:
        fn()
    assert fragment in str(info.value), f"{exc.__name__} message {str(info.value)!r} lacks {fragment!r}"


def _bad_inputs_worker(info, backend, allow_multiple_reduction):
    R = info.world_size
    buf = ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=H, num_topk=K, backend=backend,
                        allow_multiple_reduction=allow_multiple_reduction)
    other = ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=H, num_topk=K, backend=backend)
    g = torch.Generator().manual_seed(info.rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    topk = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    w = torch.rand(T, K, generator=g)

    def d(**kw):
        args = dict(x=x, topk_idx=topk, topk_weights=w, num_experts=E)
        args.update(kw)
        return buf.dispatch(args.pop("x"), **args)

    _expect(TypeError, "bfloat16", lambda: d(x=x.float()))
    _expect(ValueError, "2-D", lambda: d(x=x[None]))
    _expect(ValueError, "contiguous", lambda: d(x=torch.randn(T, 2 * H).to(torch.bfloat16)[:, ::2]))
    _expect(ValueError, "more than num_max_tokens_per_rank", lambda: d(
        x=torch.zeros(T + 1, H, dtype=torch.bfloat16), topk_idx=torch.zeros(T + 1, K, dtype=topk_idx_t),
        topk_weights=None))
    _expect(ValueError, "hidden=128", lambda: d(x=torch.zeros(T, 2 * H, dtype=torch.bfloat16)))
    _expect(TypeError, "topk_idx must be torch.int64", lambda: d(topk_idx=topk.int()))
    _expect(ValueError, "rows", lambda: d(topk_idx=topk[:-1]))
    _expect(ValueError, f"expert id {E}", lambda: d(topk_idx=torch.where(topk == 0, E, topk)))
    _expect(ValueError, "same expert twice", lambda: d(topk_idx=torch.stack([topk[:, 0], topk[:, 0]], 1)))
    _expect(ValueError, "divisible by the number of ranks", lambda: d(num_experts=E + 1))
    _expect(ValueError, "num_experts must be a positive int", lambda: d(num_experts=None))
    _expect(TypeError, "topk_weights must be torch.float32", lambda: d(topk_weights=w.double()))
    _expect(ValueError, "topk_weights must be", lambda: d(topk_weights=w[:, :1].contiguous()))
    _expect(ValueError, "num_sms", lambda: d(num_sms=-1))
    _expect(TypeError, "4-byte", lambda: d(x=(x.to(torch.float8_e4m3fn), torch.ones(T, 1, dtype=torch.float16))))
    _expect(TypeError, "float8", lambda: d(x=(x, torch.ones(T, 1))))
    _expect(ValueError, "topk_idx", lambda: buf.dispatch(x, num_experts=E))
    _expect(ValueError, "num_scaleout_topk", lambda: buf.get_theoretical_num_sms(E, K, num_scaleout_topk=1))
    assert buf.get_theoretical_num_sms(E, K) == 2  # CPU ranks: capped at their 2 "SMs"
    assert buf.get_theoretical_num_qps(24) == 24 * 16 + 1  # spec 1.5 (allow_hybrid_mode defaults to True)
    _expect(ValueError, "do_zero_padding requires do_expand", lambda: d(do_zero_padding=True))
    _expect(ValueError, "rows", lambda: d(x=(x.to(torch.float8_e4m3fn), torch.ones(T - 1, 1))))
    _expect(ValueError, "2-D", lambda: d(x=(x.to(torch.float8_e4m3fn), torch.ones(T, 1, 1))))
    _expect(ValueError, "pair", lambda: d(x=(x, x, x)))
    _expect(ValueError, "exceeds the limits", lambda: d(num_experts=4096))
    _expect(TypeError, "int32", lambda: d(cumulative_local_expert_recv_stats=torch.zeros(E // R, dtype=torch.int64)))
    _expect(ValueError, "local experts", lambda: d(cumulative_local_expert_recv_stats=torch.zeros(E, dtype=torch.int32)))
    _expect(ValueError, "allocate_on_comm_stream", lambda: d(previous_event=buf.capture()))
    _expect(ValueError, "expert_alignment", lambda: d(expert_alignment=0))
    _expect(ValueError, "num_max_tokens_per_rank", lambda: d(num_max_tokens_per_rank=0))

    _, _, recv_w, handle, _ = d()
    y = torch.zeros(handle.num_recv_tokens, H, dtype=torch.bfloat16)
    _, _, _, other_handle, _ = other.dispatch(x, topk_idx=topk, num_experts=E)
    _expect(ValueError, "another ElasticBuffer", lambda: buf.combine(y, other_handle))
    _expect(ValueError, "another ElasticBuffer", lambda: buf.dispatch(x, handle=other_handle))
    _expect(ValueError, "takes no topk_idx", lambda: buf.dispatch(x, topk_idx=topk, handle=handle))
    _expect(ValueError, "num_experts", lambda: buf.dispatch(x, handle=handle, num_experts=2 * E))
    _expect(ValueError, "rows", lambda: buf.combine(torch.zeros(handle.num_recv_tokens + 1, H, dtype=torch.bfloat16),
                                                   handle))
    _expect(TypeError, "bfloat16", lambda: buf.combine(y.float(), handle))
    _expect(ValueError, "bias[0]", lambda: buf.combine(y, handle, bias=torch.zeros(T + 1, H, dtype=torch.bfloat16)))
    _expect(ValueError, "pair", lambda: buf.combine(y, handle, bias=(x, x, x)))
    _expect(TypeError, "EPHandle", lambda: buf.combine(y, handle=None))
    _expect(ValueError, "topk_weights must be", lambda: buf.combine(y, handle, topk_weights=recv_w[:, :1]))
    _expect(ValueError, "never syncs", lambda: buf.dispatch(x, handle=handle, do_cpu_sync=True))
    # a cached dispatch takes the counters and leaves them as they are (it counts nothing: spec 2.8)
    stats = torch.full((E // R,), 7, dtype=torch.int32)
    buf.dispatch(x, handle=handle, cumulative_local_expert_recv_stats=stats)
    assert stats.tolist() == [7] * (E // R)
    _expect(TypeError, "int32", lambda: buf.dispatch(
        x, handle=handle, cumulative_local_expert_recv_stats=torch.zeros(E // R, dtype=torch.int64)))
    _expect(ValueError, "do_expand=True", lambda: buf.dispatch(x, handle=handle, do_expand=True))
    _expect(ValueError, "tokens", lambda: buf.dispatch(x[:-1], handle=handle))
    _expect(ValueError, "allocate_on_comm_stream", lambda: buf.combine(y, handle, previous_event=buf.capture()))
    _, _, recv_we, ehandle, _ = d(do_expand=True)
    ye = torch.zeros(ehandle.num_expanded_tokens, H, dtype=torch.bfloat16)
    _expect(ValueError, "expanded dispatch produced", lambda: buf.combine(ye[:-1], ehandle))
    if buf.allow_multiple_reduction:
        _expect(ValueError, "topk_weights must be", lambda: buf.combine(ye, ehandle, topk_weights=recv_we[:, None]))
    else:
        _expect(ValueError, "allow_multiple_reduction=False", lambda: buf.combine(ye, ehandle, topk_weights=recv_we))
    buf.combine(ye, ehandle)
    ev = buf.dispatch(x, handle=handle)[4]
    _expect(RuntimeError, "not asynchronous", ev.current_stream_wait)
    ev = buf.dispatch(x, handle=handle, async_with_compute_stream=True)[4]
    ev.register_hook_after_wait(lambda: None)
    _expect(RuntimeError, "already registered", lambda: ev.register_hook_after_wait(lambda: None))
    ev.current_stream_wait()

    # every rejected call left both buffers working: a full check must still pass
    buf.combine(y, handle)
    other.combine(torch.zeros(other_handle.num_recv_tokens, H, dtype=torch.bfloat16), other_handle)
    run_case(buf, Case(seed=3, num_tokens=[T] * R, hidden=H, num_experts=E, num_topk=K, num_bias=1))
    other.destroy()
    buf.destroy()
    _expect(RuntimeError, "destroyed", lambda: d())


@pytest.mark.parametrize("backend,allow_multiple_reduction", [("symmetric", True), ("alltoall", False)])
def test_bad_inputs_raise_and_buffer_keeps_working(backend, allow_multiple_reduction):
    parallel_launch(2, _bad_inputs_worker, backend, allow_multiple_reduction)


def _constructor_worker(info):
    _expect(ValueError, "multiple of", lambda: ElasticBuffer(info.group, num_bytes=12345))
    _expect(ValueError, "backend", lambda: ElasticBuffer(info.group, num_max_tokens_per_rank=4, hidden=128,
                                                         backend="rdma"))
    _expect(ValueError, "must be > 0", lambda: ElasticBuffer(info.group))
    _expect(ValueError, "num_cpu_bytes", lambda: ElasticBuffer(info.group, num_bytes=2 << 21, num_cpu_bytes=123))


def test_constructor_rejects_bad_arguments():
    parallel_launch(2, _constructor_worker)


#: the GPU timeout of the missing-rank test: long enough that the live ranks never time out on each
#: other on a loaded 2-core machine, short enough for CI
MISSING_TIMEOUT_S = 6


#: the combine's routes: "dense_ce": the rows go by copies and the reduction waits for their flags;
#: "dense_sm": SMs send them into the same layout (the default above 2 ranks); "pipelined": rows into
#: combine slots, one launch
ROUTES = {"pipelined": KernelConfig(copy_engine_min_bytes=-1, combine_by_copy_engine=True),
          "dense_ce": KernelConfig(copy_engine_min_bytes=0, combine_by_copy_engine=True), "dense_sm": None}


def _missing_rank_worker(info):
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from tritonep.backends.symmetric.combine import route as combine_route

    a = ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=H, num_topk=K,
                      num_gpu_timeout_secs=MISSING_TIMEOUT_S)
    g = torch.Generator().manual_seed(info.rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    topk = torch.rand(T, 6, generator=g).topk(K, dim=1).indices
    combines = {}  # route: (buffer, handle of a dispatch that every rank took part in)
    for route, config in ROUTES.items():
        b = ElasticBuffer(info.group, num_max_tokens_per_rank=T, hidden=H, num_topk=K,
                          num_gpu_timeout_secs=MISSING_TIMEOUT_S, config=config)
        assert combine_route(b._backend, T, H, K, 2, expand=False, host_knows_counts=True) == route
        combines[route] = (b, b.dispatch(x, topk_idx=topk, num_experts=6)[3])
    # (the launcher's store, outside the buffers: the missing rank waits there until the others
    # are done, instead of a sleep longer than their timeouts)
    store = dist.distributed_c10d._get_default_store()
    if info.rank == info.world_size - 1:  # never takes part in what follows
        store.wait([f"missing-{r}" for r in range(info.world_size - 1)], timedelta(seconds=60 * MISSING_TIMEOUT_S))
        return None
    calls = {route: (lambda b=b, h=h: b.combine(torch.zeros(h.num_recv_tokens, H, dtype=torch.bfloat16), h))
             for route, (b, h) in combines.items()}
    calls["dispatch"] = lambda: a.dispatch(x, topk_idx=topk, num_experts=6)
    messages = {}
    t0 = time.monotonic()
    for name, fn in calls.items():
        try:
            fn()
            messages[name] = None
        except CommTimeoutError as e:
            messages[name] = str(e)
    elapsed = time.monotonic() - t0
    store.set(f"missing-{info.rank}", "done")
    return messages, elapsed


def test_missing_rank_times_out_with_a_clear_error():
    """A rank that stops taking part: each other rank's combine (every route) and next dispatch
    raise CommTimeoutError naming both ranks and the operation (one launch of ranks for all four:
    each case costs a whole timeout)."""
    out = parallel_launch(3, _missing_rank_worker)
    for rank in (0, 1):
        messages, elapsed = out[rank]
        for route in ROUTES:
            msg = messages[route]
            assert msg and f"rank {rank} timed out" in msg and "combine" in msg and "waiting for rank 2" in msg, \
                (route, msg)
        msg = messages["dispatch"]
        assert msg and "dispatch" in msg and "waiting for rank 2" in msg, msg
        assert elapsed < 40 * MISSING_TIMEOUT_S  # (four timeouts, with room for a loaded machine)
