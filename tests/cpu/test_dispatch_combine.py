"""Dispatch, combine and cached dispatch on spawned CPU ranks (gloo + Triton interpreter),
bit-exact against the reference, on both backends."""
import pytest
import torch

from tritonep import KernelConfig, ElasticBuffer, sizing
from tritonep.testing.ep_check import Case, assert_bitwise_equal, run_case, random_cases
from tritonep.testing.launch import parallel_launch

MAX_T = 24
#: the kernels' timeout on other ranks: far above what a loaded 2-core machine needs (a wait that
#: never ends still fails, and parallel_launch kills a rank after its own timeout)
TIMEOUT_S = 300
#: the CPU buffers' default: SMs move every row (most cases are far below the GPU's copy-engine
#: threshold anyway); the copy-engine tests below ask for it
NO_COPY_ENGINE = KernelConfig(copy_engine_min_bytes=-1)


def _count_calls(module, name: str) -> list:
    """Wrap ``module.name`` (in this spawned rank) so that every call appends to the returned list."""
    calls, fn = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    setattr(module, name, counted)
    return calls


def _count_words(buf) -> tuple:
    """(times the synced dispatches' gather kernels raised the host counter, whether a raise was
    left untaken by the host): see ``status.CountWords``."""
    words = buf._backend.count_words.values()
    return sum(int(w.tensor[w.words]) for w in words), any(w.ready() for w in words)


def _buffer(info, backend, allow_multiple_reduction=True, use_fp8_dispatch=False, config=NO_COPY_ENGINE,
            max_tokens=MAX_T):
    """``max_tokens=0``: a buffer sized by bytes alone, whose combine flags are not sized (every
    call passes its ``num_max_tokens_per_rank``): its combine runs as two launches."""
    num_bytes = sizing.get_buffer_size_hint(info.world_size, MAX_T, 7168, 8,
                                            allow_multiple_reduction=allow_multiple_reduction)
    return ElasticBuffer(info.group, num_bytes=num_bytes, num_max_tokens_per_rank=max_tokens, backend=backend,
                         allow_multiple_reduction=allow_multiple_reduction, use_fp8_dispatch=use_fp8_dispatch,
                         num_gpu_timeout_secs=TIMEOUT_S, config=config)


def _named_cases(R):
    return [
        # DeepSeek-V3 hidden size at a small token count, top-8, uneven token counts
        Case(seed=11, num_tokens=[8 - r for r in range(R)], hidden=7168, num_experts=8 * R, num_topk=8,
             routing="skewed", masked_ratio=0.1, num_bias=2),
        # every token to one expert
        Case(seed=12, num_tokens=[MAX_T] * R, hidden=128, num_experts=2 * R, num_topk=2, routing="one_expert",
             num_bias=1),
        # nobody sends anything
        Case(seed=13, num_tokens=[0] * R, hidden=128, num_experts=R, num_topk=1),
        # expanded layout at DeepSeek-V3's hidden size, aligned and zero-padded
        Case(seed=14, num_tokens=[6] * R, hidden=7168, num_experts=4 * R, num_topk=4, expand=True,
             expert_alignment=8, zero_padding=True, num_bias=1),
    ]


def _worker(info, backend, seed, count):
    # the first buffer copies rows out of the receive area by "copy engine" whenever the host knows
    # the counts, and its combine of plain rows takes the dense layout (at 2 ranks by copy engine
    # where the dispatch synced); the second's combine pushes, then reduces (two launches)
    bufs = [_buffer(info, backend, True, config=KernelConfig(copy_engine_min_bytes=0)),
            _buffer(info, backend, False, max_tokens=0)]
    from tritonep.kernels import layout as layout_kernels

    gathers = _count_calls(layout_kernels, "gather")
    results = []
    cases = _named_cases(info.world_size) + random_cases(seed, info.world_size, count, max_tokens=MAX_T)
    for i, case in enumerate(cases):
        # expanded combines alternate between one and two reduction levels (allow_multiple_reduction)
        buf = bufs[i % 2]
        before = int(buf._backend.op_seq) if backend == "symmetric" else 0
        raised = _count_words(buf)[0] if backend == "symmetric" else 0
        launched = len(gathers)
        results.append(run_case(buf, case))
        if backend == "symmetric":  # dispatch, combine, cached dispatch: each ends its number once
            assert int(buf._backend.op_seq) == before + 3, (case, before, int(buf._backend.op_seq))
            # a synced dispatch's counts reach the host once, and the host took them
            assert _count_words(buf) == (raised + case.cpu_sync, False), (case, raised, _count_words(buf))
            # a dispatch of plain rows gathers in its count kernel (synced) or its push: no gather launch
            fused = not (case.expand or case.quantize)
            assert len(gathers) - launched == (0 if fused else 1), (case, len(gathers) - launched)
    # bf16 in, FP8 out: the dispatch kernel casts (per 128 channels; power-of-two scales too)
    fp8_buf = _buffer(info, backend, use_fp8_dispatch=True)
    R = info.world_size
    for case in (Case(seed=15, num_tokens=[9] * R, hidden=256, num_experts=2 * R, num_topk=2, quantize=True,
                      num_bias=1),
                 Case(seed=16, num_tokens=[7] * R, hidden=384, num_experts=3 * R, num_topk=3, quantize=True,
                      round_scale=True, expand=True, expert_alignment=4, cpu_sync=False)):
        before = int(fp8_buf._backend.op_seq) if backend == "symmetric" else 0
        results.append(run_case(fp8_buf, case))
        if backend == "symmetric":  # the per-token kernels (in-kernel cast, expand) end each number once too
            assert int(fp8_buf._backend.op_seq) == before + 3, (case, before, int(fp8_buf._backend.op_seq))
    for buf in bufs + [fp8_buf]:
        buf.destroy()
    return results


@pytest.mark.parametrize("num_ranks,num_random", [(2, 6), (3, 6), (4, 6), (8, 0)])
def test_symmetric_backend(num_ranks, num_random):
    # 8 ranks (DeepEP's headline EP8) with the named cases only: ~40 s on two cores
    out = parallel_launch(num_ranks, _worker, "symmetric", 1000 + num_ranks, num_random)
    assert all(len(r) == 6 + num_random for r in out)


@pytest.mark.parametrize("num_ranks", [2, 3, 4])
def test_alltoall_backend(num_ranks):
    out = parallel_launch(num_ranks, _worker, "alltoall", 1000 + num_ranks, 6)
    assert all(len(r) == 12 for r in out)


def _agree_worker(info):
    sym, a2a = _buffer(info, "symmetric"), _buffer(info, "alltoall")
    assert (sym.backend, a2a.backend) == ("symmetric", "alltoall")
    g = torch.Generator().manual_seed(5 + info.rank)
    x = torch.randn(MAX_T, 256, generator=g).to(torch.bfloat16)
    topk = torch.rand(MAX_T, 3 * info.world_size, generator=g).topk(4, dim=1).indices
    w = torch.rand(MAX_T, 4, generator=g)
    outs = []
    for buf in (sym, a2a):
        rx, rt, rw, h, _ = buf.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=3 * info.world_size)
        y = (rx.float() * 3 - 1).to(torch.bfloat16)
        cx, cw, _ = buf.combine(y, h, topk_weights=rw, bias=x)
        outs.append((rx, rt, rw, h.recv_src_metadata[:, :2], h.psum_num_recv_tokens_per_scaleup_rank, cx, cw))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    sym.destroy()
    a2a.destroy()


def test_backends_agree():
    parallel_launch(3, _agree_worker)


def _eight_worker(info, backend):
    R = info.world_size
    buf = ElasticBuffer(info.group, num_bytes=sizing.get_buffer_size_hint(R, 8, 256, 8), num_max_tokens_per_rank=8,
                        backend=backend, num_gpu_timeout_secs=TIMEOUT_S)
    for case in (Case(seed=21, num_tokens=[8 - r % 3 for r in range(R)], hidden=256, num_experts=2 * R, num_topk=8,
                      masked_ratio=0.2, num_bias=2),
                 Case(seed=22, num_tokens=[5] * R, hidden=128, num_experts=R, num_topk=3, expand=True,
                      expert_alignment=4, cpu_sync=False)):
        run_case(buf, case)
    buf.destroy()


@pytest.mark.parametrize("num_ranks, backend", [(8, "symmetric"), (8, "alltoall"), (6, "symmetric")])
def test_eight_ranks(num_ranks, backend):
    """DeepEP's headline configuration is EP8: nothing may assume two ranks, a small group, or (6
    ranks) a power of two."""
    parallel_launch(num_ranks, _eight_worker, backend)


def _copy_engine_worker(info):
    # exact outputs, two-launch dispatch: every synced dispatch and its cached dispatch copy the
    # peers' rows with copy_engine.copy_rows (a strided torch copy on CPU ranks), the rest by kernel;
    # every combine of a synced handle (not expanded) sends its rows with copy_engine.copy_bytes
    # (memmove on CPU ranks) and reduces them with reduce_dense
    from tritonep import copy_engine
    from tritonep.kernels import combine_dense

    reduces = _count_calls(combine_dense, "reduce_dense")
    flag_copies, copy_bytes = [], copy_engine.copy_bytes

    def counted_copy(dst, src, nbytes, stream):
        flag_copies.append(src == flag_src)
        return copy_bytes(dst, src, nbytes, stream)

    copy_engine.copy_bytes = counted_copy
    # (by default only groups of 2 ranks combine by copy engine)
    buf = _buffer(info, "symmetric", config=KernelConfig(copy_engine_min_bytes=0, combine_by_copy_engine=True))
    flag_src = buf._backend.minus_one.data_ptr()
    before = int(buf._backend.op_seq)
    R = info.world_size
    cases = _named_cases(R) + [
        # only even ranks sync their dispatch: the others' hosts do not know the counts, and their
        # SMs send into the layout that the copies use (one program per chunk: T = 24 rows < 256)
        Case(seed=17, num_tokens=[MAX_T - 3 * r for r in range(R)], hidden=256, num_experts=4 * R, num_topk=4,
             masked_ratio=0.1, num_bias=1, cpu_sync=info.rank % 2 == 0)]
    out = [run_case(buf, case) for case in cases]
    assert int(buf._backend.op_seq) == before + 3 * len(cases)
    # four non-expanded cases; the one where nobody sends anything still enters and ends
    assert len(reduces) == 4, len(reduces)
    assert any(flag_copies), "no flag copies"
    buf.destroy()
    return out


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_copy_engine_rows(num_ranks):
    parallel_launch(num_ranks, _copy_engine_worker)


def _copy_engine_blocks_worker(info, chunk_rows):
    # more rows per source than one flag block (combine_dense.FLAG_ROWS): one copy raises several
    # flags, the SM sender (odd ranks: no host counts) has several blocks per peer, and the steps
    # of the reduction wait for the blocks their rows are in
    R, T = info.world_size, 200
    config = KernelConfig(copy_engine_min_bytes=0, combine_by_copy_engine=True)
    if chunk_rows:  # 128-row copies, reduced 32 tokens at a time, sent in 16 x 8-word steps
        config = KernelConfig(copy_engine_min_bytes=0, combine_by_copy_engine=True, copy_engine_chunk_rows=chunk_rows,
                        combine_dense_reduce_tile=(32, 64, 4), combine_dense_send_tile=(16, 8))
    buf = ElasticBuffer(info.group, num_bytes=sizing.get_buffer_size_hint(R, T, 64, 2), num_max_tokens_per_rank=T,
                        backend="symmetric", num_gpu_timeout_secs=TIMEOUT_S, config=config)
    out = [run_case(buf, Case(seed=18 + i, num_tokens=[T - 13 * r for r in range(R)], hidden=64, num_experts=2 * R,
                              num_topk=2, num_bias=i, cpu_sync=sync))
           for i, sync in enumerate((True, info.rank % 2 == 0))]
    buf.destroy()
    return out


@pytest.mark.parametrize("num_ranks, chunk_rows", [(2, 0), (3, 0), (3, 128)])
def test_copy_engine_combine_blocks(num_ranks, chunk_rows):
    """Chunks of the default size (256 rows: each region of ~200 rows in one) or of 128 rows (then
    reduced 32 tokens at a time, sent in 16 x 8-word steps)."""
    parallel_launch(num_ranks, _copy_engine_blocks_worker, chunk_rows)


@pytest.mark.parametrize("count, chunk", [(8160, 1024), (8192, 1024), (200, 256), (1000, 256), (0, 256), (130, 128)])
def test_chunk_bounds_tile_the_region(count, chunk):
    from tritonep.kernels.combine_dense import FLAG_ROWS, chunk_bounds

    bounds = chunk_bounds(count, chunk)
    assert [r0 for r0, _ in bounds] == [sum(n for _, n in bounds[:i]) for i in range(len(bounds))]
    assert sum(n for _, n in bounds) == count and all(0 < n <= chunk for _, n in bounds)
    assert all(r0 % FLAG_ROWS == 0 for r0, _ in bounds)  # a flag block is never shared by two copies


def _push_tiles_worker(info):
    # dispatch pushes in steps other than the default (32 tokens): 16 tokens (one layout block) and
    # 64 tokens of 64 words (four blocks per step, several column steps per row); bf16 and fp8
    # rows, a rank with no tokens, skewed routing, with and without a CPU sync
    R = info.world_size
    bufs = [_buffer(info, "symmetric", config=KernelConfig(copy_engine_min_bytes=-1, dispatch_push_tile=tile))
            for tile in ((16, 512, 8), (64, 64, 4))]
    cases = [Case(seed=80, num_tokens=[MAX_T - 5 * r for r in range(R)], hidden=256, num_experts=4 * R, num_topk=4,
                  routing="skewed", masked_ratio=0.1, num_bias=1),
             Case(seed=81, num_tokens=[0] + [MAX_T] * (R - 1), hidden=7168, num_experts=8 * R, num_topk=8, fp8=True,
                  cpu_sync=False)]
    out = [run_case(buf, case) for buf in bufs for case in cases]
    for buf in bufs:
        buf.destroy()
    return out


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_push_tiles(num_ranks):
    parallel_launch(num_ranks, _push_tiles_worker)


def _alltoall_calls_worker(info):
    # the handle keeps the all-to-all backend's send order and row counts: a cached dispatch and a
    # combine move their rows with one all-to-all each and no count exchange (bit-exact still)
    import torch.distributed as dist

    calls = _count_calls(dist, "all_to_all_single")
    buf = _buffer(info, "alltoall")
    case = Case(seed=70, num_tokens=[MAX_T - 2 * r for r in range(info.world_size)], hidden=128,
                num_experts=4 * info.world_size, num_topk=4, masked_ratio=0.1, num_bias=1)
    out = run_case(buf, case)  # dispatch (counts + rows), combine (rows), cached dispatch (rows)
    assert len(calls) == 4, calls
    buf.destroy()
    return out


def test_alltoall_handle_skips_count_exchange():
    parallel_launch(2, _alltoall_calls_worker)


def _wrap_worker(info):
    import torch.distributed as dist

    from tritonep.kernels.primitives import SEQ_WRAP

    R = info.world_size
    buf = _buffer(info, "symmetric")
    backend = buf._backend
    # pretend 2^31 - 3 operations already ran: every rank's flags hold the last number
    last = SEQ_WRAP - 2
    ready, freed, notified = sizing.signal_offsets(R)[:3]
    for word in (ready, freed, notified):
        backend.heap.signals[word:word + R] = last
    backend.op_seq.fill_(last)
    dist.barrier()
    for i in range(3):  # numbers SEQ_WRAP - 1, SEQ_WRAP, 1, 2, 3, 4, ...: crosses the wrap
        run_case(buf, Case(seed=40 + i, num_tokens=[6] * R, hidden=128, num_experts=2 * R, num_topk=2, num_bias=1))
    seq = int(backend.op_seq)
    assert 0 < seq < 10, seq
    buf.destroy()


def test_operation_numbers_wrap():
    parallel_launch(2, _wrap_worker)


def _many_blocks_worker(info):
    # more tokens than one block of the layout kernels (64) and of the row kernels (16): the block
    # prefix sums, several programs and both dispatch paths
    # (and one program per kernel on the second buffer: its combine runs as two launches)
    R, T = info.world_size, 150
    bufs = [ElasticBuffer(info.group, num_bytes=sizing.get_buffer_size_hint(R, T, 128, 4), num_max_tokens_per_rank=T,
                          backend="symmetric", num_gpu_timeout_secs=TIMEOUT_S, num_sms=num_sms)
            for num_sms in (3, 1)]
    cases = (Case(seed=31, num_tokens=[150, 131], hidden=128, num_experts=4 * R, num_topk=4, masked_ratio=0.1,
                  num_bias=1),
             Case(seed=32, num_tokens=[97, 150], hidden=128, num_experts=4 * R, num_topk=4, expand=True,
                  expert_alignment=8, routing="skewed"))
    for buf in bufs:
        for case in cases:
            run_case(buf, case)
    for buf in bufs:
        buf.destroy()


def test_many_token_blocks():
    parallel_launch(2, _many_blocks_worker)


def test_a_failed_check_says_where_the_wrong_elements_lie():
    want = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) + 8
    got = want.clone()
    got.view(-1)[37:70] = 0  # rows 2-4, one contiguous span of zeros
    with pytest.raises(AssertionError) as e:
        assert_bitwise_equal("recv_x", got, want, "[here] ")
    text = str(e.value)
    assert text.startswith("[here] recv_x: 33 of 96 elements differ from the reference; first at [2, 5]: got 0.0")
    assert "rows (elements): 2 (11), 3 (16), 4 (6); columns 0..15" in text
    assert "all of them zero; flat 37..69 (contiguous" in text
    got.view(-1)[40] = want.view(-1)[40]
    with pytest.raises(AssertionError, match="flat 37..69 \\(with gaps"):
        assert_bitwise_equal("recv_x", got, want)
    assert_bitwise_equal("recv_x", want.clone(), want)
