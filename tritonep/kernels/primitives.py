"""Device primitives shared by every kernel: clock, spin-wait with timeout, signals, and the
"last program of the launch" detector. The only place that knows GPU and interpreter differ.

Signals are int32 words in the symmetric heap's signal area, addressed by raw int64 addresses.
A wait polls with ``atomic_add(p, 0, sem="acquire", scope="sys")``: as fast as an inline
``ld.acquire.sys`` in a flag ping-pong between two GPUs, and it also runs under the
interpreter, where inline PTX does not.
"""
from __future__ import annotations

import time

import triton
import triton.language as tl

from . import INTERPRET, block_size
from .launch import launch

# Error codes written to a buffer's status word by a wait that timed out (see ``errors.py``).
OP_DISPATCH_SEND = tl.constexpr(1)  # dispatch: waiting for a peer to release its receive buffer
OP_DISPATCH_RECV = tl.constexpr(2)  # dispatch: waiting for a peer's tokens
OP_COMBINE_SEND = tl.constexpr(3)
OP_COMBINE_RECV = tl.constexpr(4)
OP_BARRIER = tl.constexpr(5)
# not a timeout: a dispatch that would write more output rows than it has (errors.OP_RECV_OVERFLOW)
OP_RECV_OVERFLOW = tl.constexpr(8)

#: operation numbers wrap from this one back to 1 (see :func:`op_seq`); the flags only ever hold
#: the previous or the current number, so equality tests stay exact across the wrap
SEQ_WRAP = 2**31 - 1


def device_fn(fn):
    """``@triton.jit`` for a helper called from kernels. Under the interpreter the helper stays a
    plain function: the interpreter re-patches ``triton.language`` on every call of a jitted
    helper (milliseconds each, which dominated CPU test time), while a plain function runs inside
    the already-patched kernel. Same source, inlined either way."""
    return fn if INTERPRET else triton.jit(fn)


if INTERPRET:
    # Ranks are processes that share few cores; a short sleep per poll lets the rank being waited
    # for run instead of competing with the spinner.
    _PAUSE_S = 100e-6

    def _host_now_ns():
        return time.monotonic_ns()

    def _host_pause():
        time.sleep(_PAUSE_S)

    def now_ns():
        return _host_now_ns()

    def pause():
        _host_pause()

else:

    @triton.jit
    def now_ns():
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                         pack=1)

    @triton.jit
    def pause():
        pass


if INTERPRET:

    def to_bf16(x):
        """fp32 -> bf16, round to nearest even (the interpreter's own cast truncates)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        out = tl.where(is_nan, 0x7FC0, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)

else:

    @triton.jit
    def to_bf16(x):
        """fp32 -> bf16, round to nearest even (cvt.rn.bf16.f32)."""
        return x.to(tl.bfloat16)


@device_fn
def int32_ptr(addr):
    return addr.to(tl.pointer_type(tl.int32))


@device_fn
def wait_words_timed(ptrs, mask, target, timeout_ns, skip):
    """Spin until the int32 words at ``ptrs`` (a vector of pointers) all equal ``target`` where
    ``mask``.

    Returns ``(late, waited)``: ``late`` is -1 when they do (or when ``skip`` is true: nothing is
    waited for), else, after ``timeout_ns``, the lane of the first word that never arrived;
    ``waited`` (int64 per lane) how long each word took to arrive, to within one poll (ns; 0 where
    it was there at once). Ends with a CTA barrier so that every thread's later loads are ordered
    after the acquiring polls.
    """
    v = tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
    missing = tl.sum((mask & (v != target)).to(tl.int32))
    missing = tl.where(skip, 0, missing)
    start = now_ns()
    deadline = start + timeout_ns
    late = missing * 0
    waited = (v * 0).to(tl.int64)
    while (missing > 0) & (late == 0):
        pause()
        v = tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
        pending = mask & (v != target)
        missing = tl.sum(pending.to(tl.int32))
        t = now_ns()
        waited = tl.where(pending, waited * 0 + (t - start), waited)
        if t > deadline:
            late = missing * 0 + 1
    # (every loop-carried value is read after the loop: Triton 3.6 fails to compile the loop
    # otherwise; and words that all arrived by the deadline are not late)
    late = tl.where(missing > 0, late, 0)
    lanes = tl.arange(0, ptrs.shape[0])
    first = tl.min(tl.where(mask & (v != target), lanes, ptrs.shape[0]))
    tl.debug_barrier()
    return tl.where(late != 0, first, -1), waited


@device_fn
def wait_words(ptrs, mask, target, timeout_ns, skip):
    """:func:`wait_words_timed` without the times: the lane that never arrived, or -1. (A loop of its
    own: Triton 3.6 fails to compile a loop whose carried times are never read.)"""
    v = tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
    missing = tl.sum((mask & (v != target)).to(tl.int32))
    missing = tl.where(skip, 0, missing)
    deadline = now_ns() + timeout_ns
    late = missing * 0
    while (missing > 0) & (late == 0):
        pause()
        v = tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
        missing = tl.sum((mask & (v != target)).to(tl.int32))
        if now_ns() > deadline:
            late = missing * 0 + 1
    late = tl.where(missing > 0, late, 0)  # (words that all arrived by the deadline are not late)
    lanes = tl.arange(0, ptrs.shape[0])
    first = tl.min(tl.where(mask & (v != target), lanes, ptrs.shape[0]))
    tl.debug_barrier()
    return tl.where(late != 0, first, -1)


@device_fn
def wait_all_equal(sig_addr, num_words, target, timeout_ns, skip, BLOCK: tl.constexpr):
    """:func:`wait_words` on the consecutive words ``sig_addr[0:num_words]`` (a raw address)."""
    offs = tl.arange(0, BLOCK)
    return wait_words(int32_ptr(sig_addr + offs.to(tl.int64) * 4), offs < num_words, target, timeout_ns, skip)


@device_fn
def signal_all(signal_ptrs, num_ranks, word, value, BLOCK_R: tl.constexpr):
    """Release-store ``value`` into signal word ``word`` of every rank."""
    offs = tl.arange(0, BLOCK_R)
    mask = offs < num_ranks
    bases = tl.load(signal_ptrs + offs, mask=mask, other=0)
    tl.atomic_xchg(int32_ptr(bases + word * 4), value, mask=mask, sem="release", scope="sys")


@device_fn
def arrive(counter_ptr, num_programs):
    """Count this program as finished; true for the last one, which also resets the counter.

    The barrier and the acq_rel atomic order every thread's earlier stores (remote ones included)
    before whatever the last program does next, e.g. a release signal to the peers.
    """
    tl.debug_barrier()
    c = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="sys")
    last = c == num_programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last


@device_fn
def poisoned(status_ptr):
    """True once an earlier wait of this buffer timed out: later kernels then do nothing."""
    return tl.atomic_add(status_ptr, 0, sem="relaxed", scope="gpu") != 0


@device_fn
def op_seq(seq_ptr):
    """``(seq, prev_seq)`` of the operation a launch belongs to: the buffer's device word
    ``seq_ptr`` holds the number of the last operation that ended (0 before the first), and the
    numbers go 1, 2, ..., ``SEQ_WRAP``, 1, ... Kept on the device, not passed by the host, so that a
    CUDA graph replaying an operation takes a new number on every replay."""
    prev = tl.load(seq_ptr)
    return prev % 2147483647 + 1, prev  # SEQ_WRAP


@device_fn
def record_error(status_ptr, peer, op, seq, detail):
    """Record ``(op, peer, seq, detail)`` in the status words (the first error wins), and in the
    host memory whose address words 4-5 hold (:mod:`tritonep.status`), if any: the host reads that
    at the buffer's next call, without a sync. From then on the buffer's kernels do nothing."""
    old = tl.atomic_cas(status_ptr, 0, op, sem="relaxed", scope="gpu")
    if old == 0:
        tl.store(status_ptr + 1, peer)
        tl.store(status_ptr + 2, seq)
        tl.store(status_ptr + 3, detail)
        host = tl.load((status_ptr + 4).to(tl.pointer_type(tl.int64)))
        if host != 0:
            tl.store(int32_ptr(host + 4), peer)
            tl.store(int32_ptr(host + 8), seq)
            tl.store(int32_ptr(host + 12), detail)
            tl.atomic_xchg(int32_ptr(host), op, sem="release", scope="sys")  # (the code last)


@device_fn
def record_timeout(status_ptr, late, op, seq):
    """If ``late >= 0``, :func:`record_error` ``(op, peer=late, seq)``."""
    if late >= 0:
        record_error(status_ptr, late, op, seq, 0)


@device_fn
def announce_rows(signal_ptrs, status_ptr, num_ranks, rank, over_word, announced_word, need, cap, seq,
                  BLOCK_R: tl.constexpr):
    """A dispatch with ``cap`` output rows that needs ``need``: write ``over[rank]`` (``need`` if
    more than ``cap``, else 0) into every rank, then raise ``announced[rank] = seq`` there (the
    copy epilogue of every rank waits for it and :func:`rows_verdict` reads the verdicts)."""
    if poisoned(status_ptr) == 0:
        offs = tl.arange(0, BLOCK_R)
        mask = offs < num_ranks
        bases = tl.load(signal_ptrs + offs, mask=mask, other=0)
        tl.store(int32_ptr(bases + (over_word + rank) * 4), tl.where(need > cap, need, 0), mask=mask)
        tl.debug_barrier()
        signal_all(signal_ptrs, num_ranks, announced_word + rank, seq, BLOCK_R)


@device_fn
def rows_verdict(signal_ptrs, rank, num_ranks, over_word, BLOCK_R: tl.constexpr):
    """After every peer's ``announced == seq``: ``(first, rows)``, the lowest rank whose ``over``
    word is set and the rows it needed, or ``(BLOCK_R, 0)``. Read by every program of the copy
    epilogue before the dispatch ends: once ``freed`` is raised a peer's next dispatch may write
    the words again."""
    return verdict_of(signal_ptrs, rank, over_word, tl.arange(0, BLOCK_R) < num_ranks, BLOCK_R)


@device_fn
def verdict_of(signal_ptrs, rank, over_word, lanes, BLOCK_R: tl.constexpr):
    """:func:`rows_verdict` over the ranks where ``lanes`` (a ``[BLOCK_R]`` mask) holds."""
    offs = tl.arange(0, BLOCK_R)
    mine = tl.load(signal_ptrs + rank)
    over = tl.load(int32_ptr(mine + (over_word + offs) * 4), mask=lanes, other=0, volatile=True)
    first = tl.min(tl.where(over > 0, offs, BLOCK_R))
    return first, tl.sum(tl.where(offs == first, over, 0))


@device_fn
def record_overflow(last, first, rows, status_ptr, seq, BLOCK_R: tl.constexpr):
    """The last program of the copy epilogue, after the dispatch ended (its number and ``freed`` as
    after any dispatch): if :func:`rows_verdict` found a rank that overflowed, record
    ``OP_RECV_OVERFLOW`` (that rank, the rows it needed). Every rank records it alike, so every
    rank's later kernels do nothing alike and every rank's host raises ``RecvOverflowError``."""
    if last & (first < BLOCK_R):
        record_error(status_ptr, first, OP_RECV_OVERFLOW, seq, rows)


@device_fn
def wait_peers(signal_ptrs, status_ptr, rank, num_ranks, word, target, timeout_ns, op, seq, BLOCK_R: tl.constexpr):
    """Start of an operation: wait until this rank's signal words ``word + peer`` all equal ``target``.

    On timeout records ``(op, peer, seq)``. Returns true when the kernel may go on: no earlier
    timeout poisoned this buffer and every peer arrived.
    """
    skip = poisoned(status_ptr)
    late = wait_all_equal(tl.load(signal_ptrs + rank) + word * 4, num_ranks, target, timeout_ns, skip, BLOCK_R)
    record_timeout(status_ptr, late, op, seq)
    return (late < 0) & (skip == 0)


@device_fn
def finish_part(counter_ptr, num_programs, status_ptr, signal_ptrs, num_ranks, word, value, BLOCK_R: tl.constexpr):
    """The last of ``num_programs`` programs to call this (with the same counter) raises signal word
    ``word`` to ``value`` on every rank, after every one of their stores, unless the buffer is
    poisoned. A pipelined launch's senders end with it (``ready``)."""
    if arrive(counter_ptr, num_programs):
        if poisoned(status_ptr) == 0:
            signal_all(signal_ptrs, num_ranks, word, value, BLOCK_R)


@device_fn
def finish_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, word, value, BLOCK_R: tl.constexpr):
    """End of a launch that is not the operation's last: the last program to finish raises signal
    word ``word`` to ``value`` on every rank (after every program's stores), unless the buffer is
    poisoned."""
    finish_part(counter_ptr, tl.num_programs(0), status_ptr, signal_ptrs, num_ranks, word, value, BLOCK_R)


@device_fn
def end_op(counter_ptr, status_ptr, signal_ptrs, num_ranks, word, seq, seq_ptr, BLOCK_R: tl.constexpr):
    """End of an operation's last launch: :func:`finish_op` raising ``word`` to ``seq``, and the last
    program records ``seq`` as the buffer's last operation (every program read it before arriving),
    poisoned or not, so that the next operation takes the next number. Returns true in that program."""
    last = arrive(counter_ptr, tl.num_programs(0))
    if last:
        if poisoned(status_ptr) == 0:
            signal_all(signal_ptrs, num_ranks, word, seq, BLOCK_R)
        tl.store(seq_ptr, seq)
    return last


@device_fn
def finish_pipelined(counter_ptr, status_ptr, signal_ptrs, rank, num_ranks, ready_word, freed_word, seq, seq_ptr,
                     timeout_ns, op, reset_addr, reset_words, BLOCK_R: tl.constexpr):
    """End of a launch that both sends and receives (its senders raised ``ready`` with
    :func:`finish_part`): the last program zeroes ``reset_words`` int32 words at ``reset_addr``
    (flags that the launch consumed; 0 for none), waits until every peer's ``ready == seq``, raises
    ``freed = seq`` and records ``seq`` in ``seq_ptr`` (as :func:`end_op`: no launch of the
    operation follows).

    The wait matters: a rank that receives nothing from a peer could otherwise finish and raise
    ``freed = seq`` before that peer even checked ``freed == prev_seq`` for this operation, and the
    peer would wait for ever (the CPU suite deadlocked at 3 ranks without it)."""
    if arrive(counter_ptr, tl.num_programs(0)):
        for w in range(0, reset_words, 1024):
            offs = w + tl.arange(0, 1024)
            tl.store(int32_ptr(reset_addr + offs.to(tl.int64) * 4), 0, mask=offs < reset_words)
        tl.debug_barrier()  # every thread's zeroes before the release of ``freed``
        if wait_peers(signal_ptrs, status_ptr, rank, num_ranks, ready_word, seq, timeout_ns, op, seq, BLOCK_R):
            signal_all(signal_ptrs, num_ranks, freed_word + rank, seq, BLOCK_R)
        tl.store(seq_ptr, seq)


@device_fn
def copy_words(src, dst, num_words, BLOCK: tl.constexpr):
    """Copy ``num_words`` int32 words between two int32 pointers (local or a peer's)."""
    for c in range(0, num_words, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        m = offs < num_words
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@device_fn
def _enter(signal_ptrs, status_ptr, rank, num_ranks, seq, prev_seq, ready_word, freed_word, timeout_ns, op,
           BLOCK_R: tl.constexpr):
    """Wait until every peer released the previous operation (``freed == prev_seq``), then tell
    them this rank is in operation ``seq`` (``ready = seq``)."""
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, freed_word, prev_seq, timeout_ns, op, seq, BLOCK_R)
    if ok:
        signal_all(signal_ptrs, num_ranks, ready_word + rank, seq, BLOCK_R)


@triton.jit
def _enter_kernel(signal_ptrs, status_ptr, rank, num_ranks, seq_ptr, ready_word, freed_word, timeout_ns,
                  OP: tl.constexpr, BLOCK_R: tl.constexpr):
    seq, prev_seq = op_seq(seq_ptr)
    _enter(signal_ptrs, status_ptr, rank, num_ranks, seq, prev_seq, ready_word, freed_word, timeout_ns, OP, BLOCK_R)


@triton.jit
def _barrier_kernel(signal_ptrs, status_ptr, rank, num_ranks, seq_ptr, ready_word, freed_word, timeout_ns,
                    BLOCK_R: tl.constexpr):
    """A collective with no data: every rank waits for every other, with the same
    ready/freed protocol as dispatch and combine, so it also orders against them."""
    seq, prev_seq = op_seq(seq_ptr)
    _enter(signal_ptrs, status_ptr, rank, num_ranks, seq, prev_seq, ready_word, freed_word, timeout_ns, OP_BARRIER,
           BLOCK_R)
    ok = wait_peers(signal_ptrs, status_ptr, rank, num_ranks, ready_word, seq, timeout_ns, OP_BARRIER, seq, BLOCK_R)
    if ok:
        signal_all(signal_ptrs, num_ranks, freed_word + rank, seq, BLOCK_R)
    tl.store(seq_ptr, seq)


@triton.jit
def _release_kernel(signal_ptrs, status_ptr, num_ranks, word, seq_ptr, BLOCK_R: tl.constexpr):
    seq, _ = op_seq(seq_ptr)
    if poisoned(status_ptr) == 0:
        signal_all(signal_ptrs, num_ranks, word, seq, BLOCK_R)
    tl.store(seq_ptr, seq)


def release(signal_ptrs, status, num_ranks, word, seq_ptr):
    """End the current operation early: raise signal ``word`` (e.g. this rank's ``freed``) to its
    number on every rank, and count it as ended, for a dispatch called off after its count
    exchange, so that the next operation does not wait for it."""
    launch(_release_kernel, 1, signal_ptrs, status, num_ranks, word, seq_ptr, BLOCK_R=block_size(num_ranks))


def enter(signal_ptrs, status, rank, num_ranks, seq_ptr, ready_word, freed_word, timeout_ns, op):
    """One program: :func:`_enter` for the current operation (``op``: the error code a timeout
    records). For an operation whose data the copy engine moves: the host queues the copies after
    this launch, which the copy engine cannot start before the peers released their buffers."""
    launch(_enter_kernel, 1, signal_ptrs, status, rank, num_ranks, seq_ptr, ready_word, freed_word, timeout_ns,
           OP=getattr(op, "value", op), BLOCK_R=block_size(num_ranks))


def barrier(signal_ptrs, status, rank, num_ranks, seq_ptr, ready_word, freed_word, timeout_ns):
    launch(_barrier_kernel, 1, signal_ptrs, status, rank, num_ranks, seq_ptr, ready_word, freed_word, timeout_ns,
           BLOCK_R=block_size(num_ranks))
