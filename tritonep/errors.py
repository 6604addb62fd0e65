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


OP_NAMES = {
    1: "dispatch (peer's receive buffer never released)",
    2: "dispatch (peer's tokens never arrived)",
    3: "combine (peer's receive buffer never released)",
    4: "combine (peer's rows never arrived)",
    5: "barrier",
    6: "low-latency dispatch (peer's tokens never arrived)",
    7: "low-latency combine (peer's rows never arrived)",
}


def raise_if_timed_out(status: list, rank: int, timeout_s: float, what: str = "operation") -> None:
    """Raise :class:`CommTimeoutError` if the status words a kernel keeps (``[code, peer, seq, ...]``,
    read on the host) record a wait that ran out of time."""
    code, peer, seq = status[:3]
    if code:
        raise CommTimeoutError(rank, peer, OP_NAMES.get(code, f"op {code}"), timeout_s, f"{what} #{seq}")
