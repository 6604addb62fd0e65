"""``ElasticBuffer``'s end: ``destroy()`` (a barrier, then the memory goes) and the garbage
collector's local release; its error state: ``has_failed()``, ``get_error_flag()`` and
``clear_overflow()``. After a wait on a peer ran out of time the barrier is skipped: that
peer may be dead, and a second timeout would only delay the survivors' release."""
from __future__ import annotations

import warnings

import torch


class LifetimeMixin:
    _destroyed = True  # until the constructor has built everything
    #: set by a caller that saw one of this buffer's operations time out on a peer
    _failed = False

    def mark_failed(self) -> None:
        """A wrapper (V1's Buffer) saw a wait of its own time out on a peer: destroy without a barrier."""
        self._failed = True

    def has_failed(self) -> bool:
        """Whether a wait of this buffer (its kernels, pp_* or AGRS) ran out of time on a peer."""
        status = getattr(self._backend, "status", None)
        words = getattr(self._backend, "status_words", None)
        if self._failed or (words is not None and words.failed()) or (status is not None and int(status[0]) != 0):
            return True
        return any(getattr(x, "failed", False) for x in (self._pipe, self._agrs) if x is not None)

    def get_error_flag(self) -> torch.Tensor:
        """``[1]`` int32 on the buffer's device, written by its kernels: 0 while they work, else the
        code of what stopped them (``tritonep.errors``: ``OP_RECV_OVERFLOW`` for a dispatch whose
        outputs were too small, the other codes for a wait that timed out). For CUDA graphs: read it
        after a replay; results of a replay that set it are invalid. None for a buffer whose backend
        has no device status (``alltoall``: it raises in the call itself)."""
        status = getattr(self._status_owner, "status", None)
        return status[:1] if status is not None else None

    def clear_overflow(self) -> None:
        """Collective: make the buffer usable again after :class:`tritonep.RecvOverflowError` (every
        rank's kernels did nothing since the dispatch that overflowed; this resets the protocol
        state on every rank). Call it on every rank with nothing else of this buffer in flight. A
        timeout (``CommTimeoutError``) is raised again: the buffer must be destroyed then."""
        self._check_alive()
        clear = getattr(self._status_owner, "clear_overflow", None)
        if clear is not None:  # (none: the backend raised in the call, nothing stopped)
            clear()

    def destroy(self) -> None:
        """Collective: barrier, then release the symmetric memory. The buffer is unusable afterwards.
        (DeepEP only allows this with ``explicitly_destroy=True``; tritonep allows it always.) After
        a timeout on a peer (:meth:`has_failed`) there is no barrier: each rank releases its own. The
        object keeps its few small bookkeeping tensors (status and sequence words) until it is garbage."""
        if self._destroyed:
            raise RuntimeError("this ElasticBuffer was already destroyed")
        try:
            if not self.has_failed():
                self._backend.barrier(sync=True)
        finally:
            self._destroyed = True
            self._drop_plans()
            for extra in (self._pipe, self._agrs, self._engram):  # pp_*, agrs_*, Engram state, where built
                if extra is not None:
                    extra.destroy()
            self._backend.destroy()

    def __del__(self):
        if getattr(self, "_destroyed", True):
            return
        if self.explicitly_destroy:
            warnings.warn("ElasticBuffer built with explicitly_destroy=True was never destroy()ed", ResourceWarning)
        try:
            self._backend.destroy()  # local release only: never a collective from the garbage collector
        except Exception:
            pass
