"""Launch an operation again without its Python: the host cost of eager cached dispatch and combine.

A cached dispatch or a combine given the same handle, inputs of the same kind (shapes, strides,
dtypes, 16-byte alignment) and the same options launches the same kernels with the same arguments,
except the addresses of its inputs and of the outputs it allocates. So the first such call runs as
usual inside a recording (:class:`record`: every kernel launch writes itself down in
:mod:`tritonep.recording`), and :func:`build` turns what
it launched into a :class:`Plan`: per launch, the compiled kernel, its grid and its argument list,
and where each input's or allocation's address goes (as an offset from that tensor's start); the
shapes of the tensors the call allocated; how to rebuild each result (an input, an allocation, a
view of one, or state that outlives the call); the tensors behind every other address (handle and
buffer state), kept alive by the plan. :meth:`Plan.run` allocates, writes the new addresses into
the argument lists, launches and rebuilds the results: a fraction of the full path's host time.

An integer argument computed from addresses is an :class:`tritonep.recording.Offset`: a replay
recomputes it from the new tensor's address. A call that did anything else on the GPU gets no
plan and keeps taking the full path: a torch operation other than allocating or viewing a tensor
(watched by a ``TorchDispatchMode`` while recording), GPU work queued outside a kernel launch (copy
engine, stream operations, side streams: they call :func:`tritonep.recording.taint`), inputs that
overlap in memory, or a result that is a view of an input.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import recording

#: torch operations a recorded call may make: they allocate or view, none queues GPU work
_ALLOWED = frozenset(("empty", "empty_strided", "view", "_unsafe_view", "slice", "select", "alias", "t",
                      "transpose", "permute", "as_strided", "detach", "unsqueeze", "squeeze", "expand",
                      "record_stream", "lift_fresh"))


class _Watch(TorchDispatchMode):
    """Notes the torch operations of a recorded call: allocations, and any other operation."""

    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("empty", "empty_strided"):
            self.rec.allocations.append(out)
        elif name not in _ALLOWED:
            self.rec.taint(f"torch operation {name}")
        return out


class record:
    """``with record() as r: ...``: the launches and torch operations of the block, for :func:`build`
    (not reentrant). ``strict``: the plan will be replayed with other counts (see
    :func:`tritonep.recording.depends_on_counts`)."""

    def __init__(self, strict: bool = False):
        self.strict = strict

    def __enter__(self):
        self.rec = recording.start()
        self.rec.strict = self.strict
        self.watch = _Watch(self.rec)
        self.watch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.watch.__exit__(*exc)
        finally:
            recording.stop()


def _extent(t: torch.Tensor) -> int:
    """Bytes from the first to one past the last element of ``t``."""
    if t.numel() == 0:
        return 0
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def _view(base: torch.Tensor, dtype, size: tuple, stride: tuple, offset: int) -> torch.Tensor:
    """A result view of an allocation (``dtype`` None: the allocation's)."""
    return (base if dtype is None or dtype == base.dtype else base.view(dtype)).as_strided(size, stride, offset)


class LazyView:
    """A result view that :meth:`Plan.run` did not build (``lazy_from``): its address, shape and
    dtype for what only needs those, the tensor on :meth:`make` (a view is a torch call of host
    time; docs/benchmarks.md)."""

    __slots__ = ("base", "dtype", "shape", "stride", "offset")

    def __init__(self, base: torch.Tensor, dtype, shape: tuple, stride: tuple, offset: int):
        self.base, self.dtype, self.shape, self.stride, self.offset = base, dtype or base.dtype, shape, stride, offset

    def data_ptr(self) -> int:
        return self.base.data_ptr() + self.offset * self.dtype.itemsize

    def make(self) -> torch.Tensor:
        return _view(self.base, self.dtype, self.shape, self.stride, self.offset)


class Plan:
    """The launches of one recorded call (see the module docstring)."""

    __slots__ = ("steps", "offsets", "allocations", "results", "keep", "device", "launch", "pause", "__weakref__")

    def __init__(self, steps: list, allocations: list, results: list, keep: list, device: torch.device, pause=None):
        from .kernels import launch

        # (compiled, grid, argument list, [(position, variable, offset)]: an address,
        # [(position, variable, offset, base address, scale, fits in 32 bits)]: an Offset from a
        # base, and (the launch's parameter buffer, its slots of those two lists) or None where the
        # kernel goes through Triton: see launch.pack)
        self.steps = [(*step, _packed(launch.pack(step[0], step[2]), step[3], step[4])) for step in steps]
        self.offsets = [(step[2], step[4]) for step in steps if step[4]]  # (argument list, its Offsets)
        # (shape, stride, dtype) of each tensor the call allocated, in order; shape[0] None: as
        # many rows as the host read said (see recording.host_read)
        self.allocations = allocations
        self.results = results  # how to rebuild each result (see build)
        self.keep = keep  # every tensor whose address the argument lists or results hold
        self.device = device
        self.launch = launch
        self.pause = pause  # (steps before the host read, allocations before it, read) or None

    def _allocate(self, specs, allocated: list, addrs: list, rows) -> None:
        for shape, stride, dtype in specs:
            if shape[0] is None:
                t = torch.empty((rows, *shape[1:]), dtype=dtype, device=self.device)
            else:
                t = torch.empty_strided(shape, stride, dtype=dtype, device=self.device)
            allocated.append(t)
            addrs.append(t.data_ptr())

    def _launch(self, steps, addrs: list, stream: int) -> None:
        launch = self.launch
        direct = not launch.hooks_set()
        for compiled, grid, args, subs, offsets, packed in steps:
            if packed is not None and direct:
                packed[0].launch(grid, stream, addrs, packed[1], args, packed[2])
                continue
            for position, variable, offset in subs:
                args[position] = addrs[variable] + offset
            launch.run_compiled(compiled, grid, args, stream)

    def run(self, inputs: tuple, stream: int, rows=None, lazy_from=None) -> tuple:
        """Allocate (on the current stream), launch on ``stream`` (a raw CUDA stream) with ``inputs``
        (the recorded call's input tensors, None where it had None, or anything with the tensor's
        ``data_ptr()``: only addresses are read); ``rows``: how many rows the allocations sized by
        rows get (see :func:`build`; a plan with a host read reads them). Results from index
        ``lazy_from`` on that are views come back as :class:`LazyView`. Returns ``(results, host
        values)``: what the host read returned (None without one)."""
        addrs = [0 if t is None else t.data_ptr() for t in inputs]
        allocated: list = []
        steps, specs, host = self.steps, self.allocations, None
        split, first = (self.pause[0], self.pause[1]) if self.pause else (len(steps), len(specs))
        self._allocate(specs[:first], allocated, addrs, rows)
        for args, offsets in self.offsets:  # (offsets come before any host read: see build)
            for position, variable, offset, base, scale, fits in offsets:
                value = (addrs[variable] + offset - base) // scale
                if (_I32_MIN <= value <= _I32_MAX) != fits:  # the kernel was compiled for the other width
                    raise recording.Stale
                args[position] = value
        self._launch(steps[:split], addrs, stream)
        if self.pause is not None:
            host, rows = self.pause[2]()
            self._allocate(specs[first:], allocated, addrs, rows)
            self._launch(steps[split:], addrs, stream)
        out = []
        lazy_from = len(self.results) if lazy_from is None else lazy_from
        for i, (how, what) in enumerate(self.results):
            if how == "allocation":
                out.append(allocated[what])
            elif how == "input":
                out.append(inputs[what])
            elif how == "view":
                index, dtype, size, stride, offset = what
                if i >= lazy_from:
                    out.append(LazyView(allocated[index], dtype, size, stride, offset))
                    continue
                out.append(_view(allocated[index], dtype, size, stride, offset))
            else:  # "same": the object the recorded call returned (buffer or handle state), or None
                out.append(what)
        return out, host


def _packed(packed, subs: list, offsets: list):
    """``(packed, address slots, Offset slots)`` for a replay's launch through its parameter buffer
    (:meth:`tritonep.kernels.launch.Packed.launch` reads the Offsets from the argument list), or None."""
    if packed is None:
        return None
    return (packed, *packed.resolve(subs, [(i, i) for i, *_ in offsets]))


def _find(spans: list, p: int):
    """The index of the span that holds address ``p``, or None."""
    return next((j for j, s in enumerate(spans) if s is not None and s[0] <= p < s[1]), None)


def _span(t: torch.Tensor):
    p = t.data_ptr()
    return (p, p + _extent(t))


def _result(t, inputs: list, allocations: list, alloc_spans: list):
    """How :meth:`Plan.run` rebuilds result ``t``: ``(how, what)``."""
    if t is None:
        return ("same", None)
    for i, x in enumerate(inputs):
        if t is x:
            return ("input", i)
    p = t.data_ptr()
    for j, (a, (lo, hi)) in enumerate(zip(allocations, alloc_spans)):
        # (a tensor made under the dispatch mode may reach its caller as another Python object)
        if t is a or (p == lo and t.dtype == a.dtype and t.shape == a.shape and t.stride() == a.stride()):
            return ("allocation", j)
        if lo <= p < hi:
            size = t.element_size()
            if (p - lo) % size or a.dim() != 1 or (a.numel() * a.element_size()) % size:
                return None  # (the allocations that results view are 1-D: dispatch's layout words)
            return ("view", (j, None if t.dtype == a.dtype else t.dtype, tuple(t.shape), t.stride(), (p - lo) // size))
    if any(x is not None and x.numel() and _span(x)[0] <= p < _span(x)[1] for x in inputs):
        return None  # a view of an input: not rebuilt
    return ("same", t)


def build(r: record, inputs: tuple, results: tuple, device: torch.device, rows=None):
    """The :class:`Plan` of the call recorded by ``r``, or a string that says why it cannot be
    replayed. ``inputs``: the call's input tensors (None for absent ones); ``results``: the tensors
    a replay returns (None for absent ones): each one an input, one of the call's allocations or a
    view of one, or a tensor that outlives the call (returned as is). ``rows``: allocations with
    that many rows are sized by ``Plan.run``'s ``rows`` (a host read, if any, sizes those after it)."""
    rec = r.rec
    if rec.tainted is not None:
        return rec.tainted
    allocations = rec.allocations
    if any(a.device != device or a.storage_offset() or a.untyped_storage().nbytes() != _extent(a)
           for a in allocations):
        return "an allocation is not a plain tensor on the buffer's device"
    given = rows
    split, first, read, rows = rec.pause if rec.pause is not None else (len(rec.launches), len(allocations), None, 0)
    if read is None and given is not None:  # sized by the caller's rows
        first, rows = 0, given
    if (read is not None or given is not None) and rows == 0:  # (empty outputs' addresses would stay)
        return "no rows to size the outputs by"
    variables = list(inputs) + allocations
    spans = [None if v is None else _span(v) for v in variables]
    ordered = sorted(s for s in spans if s is not None and s[1] > s[0])
    if any(a[1] > b[0] for a, b in zip(ordered, ordered[1:])):
        return "inputs or allocations overlap in memory"
    recipes = [_result(t, list(inputs), allocations, spans[len(inputs):]) for t in results]
    if None in recipes:
        return "a result is a view that cannot be rebuilt"
    steps, keep = [], [what for how, what in recipes if how == "same" and what is not None]
    if any(how == "view" and what[0] >= first for how, what in recipes):
        return "a result views an allocation sized by the host read"
    for n, (compiled, grid, args, tail) in enumerate(rec.launches):
        call = list(args) + list(tail)
        subs, offsets = [], []
        for i, a in enumerate(args):
            if isinstance(a, recording.Offset):
                p = a.tensor.data_ptr()
                var = _find(spans, p)
                if var is not None:
                    if n >= split:
                        return "an address offset after the host read"
                    offsets.append((i, var, p - spans[var][0], a.base.data_ptr(), a.scale, _I32_MIN <= a <= _I32_MAX))
                    keep.append(a.base)
                continue
            if not isinstance(a, torch.Tensor):
                continue
            p = a.data_ptr()
            var = _find(spans, p)
            if var is not None:
                subs.append((i, var, p - spans[var][0]))
                call[i] = 0
            else:  # buffer or handle state: the same address every call
                keep.append(a)
                call[i] = p
        steps.append((compiled, grid, call, subs, offsets))
    specs = [(tuple(a.shape), a.stride(), a.dtype) for a in allocations]
    for j in range(first, len(specs)):  # sized by the rows of the next call (or its host read)
        shape, stride, dtype = specs[j]
        if shape and shape[0] == rows:
            if not allocations[j].is_contiguous():
                return "an allocation sized by the host read is not contiguous"
            specs[j] = ((None, *shape[1:]), None, dtype)
    pause = (split, first, read) if read is not None else None
    return Plan(steps, specs, recipes, keep, device, pause)


__all__ = ["Plan", "LazyView", "record", "build"]
