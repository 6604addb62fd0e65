"""Kernel launches with less host time than ``kernel[grid](...)``.

Why: Triton's JIT binds and specializes every argument on every call (tens of microseconds for our
~45 arguments) and then looks the kernel up; with 4-5 launches per dispatch that host time sits
between kernels whenever the GPU waits for the host (after the dispatch's
count read, always at small token counts).

How: the first call with a given *key* goes through Triton as usual, which compiles or finds the
kernel and returns its ``CompiledKernel``; later calls with the same key launch that compiled
kernel directly. The key is never coarser than what Triton specializes on: every tensor's dtype and
whether its address is 16-byte aligned; every other positional value itself (our integer
arguments other than the ``do_not_specialize`` ones are per-buffer constants), except the
``do_not_specialize`` integers, which Triton types only by range (32 or 64 bit, each on its own); the keyword
arguments (constexprs and launch options) by value. A finer key only costs one more trip through
Triton, never a wrong kernel. Which positions hold tensors is learnt from the first call; a later
call that breaks the pattern goes through Triton (and, past a cap, is no longer cached).

A reused kernel is launched through its compiled launcher directly, on the current stream, with
every tensor passed as its address: Triton's launcher would otherwise call ``data_ptr()`` and ask
the driver about each pointer (``cuPointerGetAttribute``), a driver call per tensor per launch.

While :mod:`tritonep.replay` records an operation, every launch also writes itself down in
:mod:`tritonep.recording` (the compiled kernel, the grid, the arguments), so that the operation
can be launched again without Python in between.

Under the Triton interpreter (CPU ranks) every launch goes through Triton: there is nothing
compiled to reuse. ``Launcher(kernel, fast=False)`` does the same on GPUs (for A/B timing and
debugging).
"""
from __future__ import annotations

import operator

import torch

from .. import recording
from . import INTERPRET

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")
_data_ptr, _dtype = torch.Tensor.data_ptr, operator.attrgetter("dtype")
_MAX_KEYS = 64  # per kernel: a caller whose key never repeats must not grow the cache forever
_device = (lambda: -1) if INTERPRET else torch.cuda.current_device
#: the current stream of a device as a raw handle, without building a Stream object
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
if INTERPRET or _raw_stream is None:  # (compiling without a GPU: nothing is launched)
    _raw_stream = lambda device: 0  # noqa: E731
try:
    from triton import knobs as _knobs
except ImportError:  # (older Triton: no launch hooks to honour)
    _knobs = None


def _getter(positions: list):
    """``args -> tuple(args[i] for i in positions)``, without a Python loop per call."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


class Launcher:
    """Launches one ``@triton.jit`` kernel; see the module docstring."""

    def __init__(self, kernel, fast: bool | None = None):
        self.kernel = kernel
        self.fast = (not INTERPRET) if fast is None else fast
        self._compiled: dict = {}
        self._pattern = None
        if self.fast:  # (the interpreter's kernels have no parameter table)
            self._params = [(p.name, p.default) for p in kernel.params]
            self._constexprs = {p.name for p in kernel.params if p.is_constexpr}
            self._no_spec = {i for i, p in enumerate(kernel.params) if p.do_not_specialize}

    def key(self, args: tuple, kwargs: dict, device: int):
        """The key of a call (see the module docstring); raises on a call that breaks the pattern."""
        return self._key(args, kwargs, device)[0]

    def _key(self, args: tuple, kwargs: dict, device: int):
        """``(key, the tensors' addresses)``."""
        if self._pattern is None:
            self._learn(args)
        n, tensors, loose, exact = self._pattern
        if len(args) != n:
            raise TypeError("argument count changed")
        ts = tensors(args)
        ptrs = list(map(_data_ptr, ts))
        values = exact(args)  # with their types: True == 1, but Triton types them apart
        # (flat tuples: a tuple per tensor costs more than the rest of the key)
        return (device, tuple(map(_dtype, ts)), tuple([p & 15 for p in ptrs]),
                tuple([_I32_MIN <= v <= _I32_MAX for v in loose(args)]), values, tuple(map(type, values)),
                tuple(kwargs.items())), ptrs

    def __call__(self, grid: int, *args, **kwargs):
        if not self.fast:
            self.kernel[(grid,)](*args, **kwargs)
            recording.taint(f"{self.kernel.__name__} launched through Triton")
            return
        try:
            key, ptrs = self._key(args, kwargs, _device())
            entry = self._compiled.get(key)
        except (AttributeError, TypeError):  # the pattern broke: Triton checks everything
            key = entry = None
        if entry is None:
            bad = [k for k in kwargs if k not in self._constexprs and k not in _OPTIONS]
            if bad:  # they would be keyed by value: pass runtime arguments by position
                raise TypeError(f"{self.kernel.__name__}: runtime arguments {bad} must be positional")
            # Triton compiles (or finds) the kernel and launches it; keep what it returns
            compiled = self.kernel[(grid,)](*args, **kwargs)
            # the compiled kernel takes every parameter in signature order, constexprs included:
            # the ones after the positional arguments are fixed by the key
            tail = tuple(kwargs.get(name, default) for name, default in self._params[len(args):])
            if compiled is not None and key is not None and len(self._compiled) < _MAX_KEYS:
                self._compiled[key] = (compiled, tail)
            if recording.active is not None:
                if compiled is None:
                    recording.taint(f"{self.kernel.__name__}: no compiled kernel")
                else:
                    recording.active.add(compiled, grid, args, tail)
            return
        compiled, tail = entry
        call = list(args)
        for i, p in zip(self._tensor_positions, ptrs):
            call[i] = p
        call.extend(tail)
        run_compiled(compiled, grid, call)
        if recording.active is not None:
            recording.active.add(compiled, grid, args, tail)

    def _learn(self, args: tuple) -> None:
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        # (int subclasses too: recording.Offset)
        loose = [i for i, a in enumerate(args) if isinstance(a, int) and type(a) is not bool and i in self._no_spec]
        exact = [i for i in range(len(args)) if i not in tensors and i not in loose]
        self._tensor_positions = tensors
        self._pattern = (len(args), _getter(tensors), _getter(loose), _getter(exact))


def _hooked(hook) -> bool:
    """Whether a launch hook is set (newer Triton keeps a chain of hooks that may be empty)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def run_compiled(compiled, grid: int, args: list, stream: int | None = None) -> None:
    """Launch ``compiled`` (a Triton ``CompiledKernel``) on ``(grid, 1, 1)`` programs with ``args``
    (every parameter in signature order, tensors as addresses) on ``stream`` (a raw CUDA stream;
    None: the current one). Launch hooks (profilers) go through Triton's runner."""
    if stream is None:
        stream = _raw_stream(_device())
    if _knobs is not None and (_hooked(_knobs.runtime.launch_enter_hook) or _hooked(_knobs.runtime.launch_exit_hook)):
        compiled[(grid, 1, 1)](*args, stream=stream)
        return
    compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)


_LAUNCHERS: dict = {}


def launch(kernel, grid: int, *args, **kwargs) -> None:
    """``kernel[(grid,)](*args, **kwargs)`` through the kernel's :class:`Launcher`: runtime
    parameters by position, in order; constexprs and launch options (``num_warps``) by keyword."""
    runner = _LAUNCHERS.get(kernel)
    if runner is None:
        runner = _LAUNCHERS[kernel] = Launcher(kernel)
    runner(grid, *args, **kwargs)


__all__ = ["Launcher", "launch", "run_compiled"]
