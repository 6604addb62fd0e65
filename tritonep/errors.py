"""Exceptions raised by tritonep."""
from __future__ import annotations


class CommTimeoutError(TimeoutError):
    """A wait on another rank ran out of time. Names the waiting rank, the peer and the operation.

    After it the buffer is unusable (its peers' protocol state is unknown): destroy it and build
    a new one.
    """

    def __init__(self, rank: int, peer: int, op: str, timeout_s: float, detail: str = ""):
        self.rank, self.peer, self.op, self.timeout_s = rank, peer, op, timeout_s
        msg = f"tritonep: rank {rank} timed out after {timeout_s:g} s in {op} waiting for rank {peer}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class RecvOverflowError(RuntimeError):
    """A dispatch without a host sync would have received more rows than its outputs hold
    (``num_max_recv_tokens``). Raised on every rank: the rank that overflowed and its peers, whose
    combine of those tokens could not be complete. No output row past the capacity was written.

    With a device status (``seq`` set: the symmetric heap's kernels recorded it) the buffer's
    kernels do nothing from that dispatch on, on every rank alike, so nothing hangs, and every call
    raises this until every rank calls ``buffer.clear_overflow()``. Without one (``seq`` None: the
    host knew the counts) it is raised by the dispatch itself and the buffer stays usable.
    """

    def __init__(self, rank: int, peer: int, rows: int, seq: int | None):
        self.rank, self.peer, self.rows, self.seq = rank, peer, rows, seq
        who = "this rank" if peer == rank else f"rank {peer}"
        what = f"dispatch #{seq}" if seq is not None else "this dispatch"
        then = ("its results are invalid and the buffer does nothing until every rank calls "
                "buffer.clear_overflow()" if seq is not None else "no results were returned")
        super().__init__(f"tritonep: rank {rank}: {what} would have given {who} {rows} rows, more than "
                         f"num_max_recv_tokens: {then} (raise num_max_recv_tokens, or dispatch with do_cpu_sync=True)")


#: status code of a dispatch whose outputs overflowed (``kernels.primitives.OP_RECV_OVERFLOW``)
OP_RECV_OVERFLOW = 8

OP_NAMES = {
    1: "dispatch (peer's receive buffer never released)",
    2: "dispatch (peer's tokens never arrived)",
    3: "combine (peer's receive buffer never released)",
    4: "combine (peer's rows never arrived)",
    5: "barrier",
    6: "low-latency dispatch (peer's tokens never arrived)",
    7: "low-latency combine (peer's rows never arrived)",
}


def raise_recorded(status: list, rank: int, timeout_s: float, what: str = "operation") -> None:
    """Raise what the status words a kernel keeps (``[code, peer, seq, detail]``, read on the host)
    record: :class:`RecvOverflowError` (``detail``: the rows needed) or :class:`CommTimeoutError`
    (a wait that ran out of time)."""
    code, peer, seq = status[:3]
    if code == OP_RECV_OVERFLOW:
        raise RecvOverflowError(rank, peer, status[3], seq)
    if code:
        raise CommTimeoutError(rank, peer, OP_NAMES.get(code, f"op {code}"), timeout_s, f"{what} #{seq}")
