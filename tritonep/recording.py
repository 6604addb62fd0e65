"""What a recorded operation launched (for :mod:`tritonep.replay`), in a module that imports
nothing: kernel launches (:mod:`tritonep.kernels.launch`) add themselves to the recording in
progress, and code that queues GPU work by other means (copy engine, stream memory operations,
side streams) calls :func:`taint`, so that the operation is never replayed without that work. An
integer computed from tensor addresses travels as an :class:`Offset`, so that a replay recomputes it."""
from __future__ import annotations


class Recording:
    """What one recorded call did: ``launches`` holds ``(compiled, grid, args, tail)``;
    ``tainted``: why the call cannot be replayed, or None."""

    def __init__(self):
        self.launches: list = []
        self.allocations: list = []  # (tritonep.replay's dispatch mode adds every tensor allocated)
        self.tainted: str | None = None
        self.pause = None  # (launches, allocations, read, rows) at the host read, if any
        self.strict = False  # replays will see other counts: a route chosen by counts taints

    def add(self, compiled, grid: int, args: tuple, tail: tuple) -> None:
        self.launches.append((compiled, grid, args, tail))

    def taint(self, reason: str) -> None:
        if self.tainted is None:
            self.tainted = reason

    def host_read(self, read, rows: int) -> None:
        if self.pause is not None:
            self.taint("two host reads")
        self.pause = (len(self.launches), len(self.allocations), read, rows)


#: the recording in progress, if any (kernel launches add themselves to it)
active: Recording | None = None


def taint(reason: str) -> None:
    """Mark the recording in progress (if any) as not replayable: GPU work was queued outside a
    kernel launch."""
    if active is not None:
        active.taint(reason)


def depends_on_counts(reason: str) -> None:
    """The operation took a route that its counts chose: a plan that other counts will replay
    (a strict recording) must not keep it."""
    if active is not None and active.strict:
        active.taint(reason)


def host_read(read, rows: int) -> None:
    """The operation read values on the host (a synced dispatch's counts) and sized what it
    allocates next by them: a replay calls ``read()`` at this point, which must queue and do the
    same read and return ``(host values, rows)``; allocations after it whose first dimension was
    ``rows`` get the new ``rows``."""
    if active is not None:
        active.host_read(read, rows)


class Offset(int):
    """An integer argument that is the distance from ``base`` to ``tensor`` in elements of
    ``scale`` bytes (a kernel that reads ``tensor`` through ``base``'s pointer). It is an ``int`` to
    Triton; a replay recomputes it from the new ``tensor``'s address."""

    tensor = base = None
    scale = 1

    @classmethod
    def between(cls, tensor, base, scale: int) -> "Offset":
        off = cls((tensor.data_ptr() - base.data_ptr()) // scale)
        off.tensor, off.base, off.scale = tensor, base, scale
        return off


class Stale(Exception):
    """A replay would hand a kernel an :class:`Offset` of another integer width than it was compiled
    for (raised before anything is launched): the call takes the full path."""


def start() -> Recording:
    """Begin a recording (not reentrant)."""
    global active
    if active is not None:
        raise RuntimeError("a recording is already in progress")
    active = Recording()
    return active


def stop() -> None:
    global active
    active = None


__all__ = ["Recording", "Offset", "Stale", "active", "taint", "depends_on_counts", "host_read", "start", "stop"]
