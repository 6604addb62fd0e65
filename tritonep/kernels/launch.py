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

A reused kernel is launched on the current stream with every tensor passed as its address:
Triton's launcher would otherwise call ``data_ptr()`` and ask the driver about each pointer
(``cuPointerGetAttribute``), a driver call per tensor per launch. Where it can (:func:`pack`), it
goes straight to the driver's ``cuLaunchKernel`` with a parameter buffer built once per compiled
kernel and key, in which a call rewrites only what changes (addresses and ``do_not_specialize``
integers): Triton's launcher converts every one of our ~45 arguments from Python on every call.

While :mod:`tritonep.replay` records an operation, every launch also writes itself down in
:mod:`tritonep.recording` (the compiled kernel, the grid, the arguments), so that the operation
can be launched again without Python in between.

Under the Triton interpreter (CPU ranks) every launch goes through Triton: there is nothing
compiled to reuse. ``Launcher(kernel, fast=False)`` does the same on GPUs (for A/B timing and
debugging).
"""
from __future__ import annotations

import ctypes
import operator
import struct
import threading

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

    def __init__(self, kernel, fast: bool | None = None, packed: bool = True):
        self.kernel = kernel
        self.fast = (not INTERPRET) if fast is None else fast
        self.packed = packed  # (False: every reuse goes through Triton's compiled launcher)
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
        """``(key, the tensors' addresses, the do_not_specialize integers)``."""
        if self._pattern is None:
            self._learn(args)
        n, tensors, loose, exact = self._pattern
        if len(args) != n:
            raise TypeError("argument count changed")
        ts = tensors(args)
        ptrs = list(map(_data_ptr, ts))
        values = exact(args)  # with their types: True == 1, but Triton types them apart
        ints = loose(args)
        # (flat tuples: a tuple per tensor costs more than the rest of the key)
        return (device, tuple(map(_dtype, ts)), tuple([p & 15 for p in ptrs]),
                tuple([_I32_MIN <= v <= _I32_MAX for v in ints]), values, tuple(map(type, values)),
                tuple(kwargs.items())), ptrs, ints

    def __call__(self, grid: int, *args, **kwargs):
        if not self.fast:
            self.kernel[(grid,)](*args, **kwargs)
            recording.taint(f"{self.kernel.__name__} launched through Triton")
            return
        try:
            device = _device()
            key, ptrs, ints = self._key(args, kwargs, device)
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
                self._compiled[key] = [compiled, tail, None if self.packed else False]
            if recording.active is not None:
                if compiled is None:
                    recording.taint(f"{self.kernel.__name__}: no compiled kernel")
                else:
                    recording.active.add(compiled, grid, args, tail)
            return
        compiled, tail, packed = entry
        if packed and not hooks_set():
            packed[0].launch(grid, _raw_stream(device), ptrs, packed[1], ints, packed[2])
        else:
            call = list(args)
            for i, p in zip(self._tensor_positions, ptrs):
                call[i] = p
            call.extend(tail)
            if packed is None:  # (the first reuse: build the parameter buffer, or False where none)
                entry[2] = self._packed(compiled, call)
            run_compiled(compiled, grid, call)
        if recording.active is not None:
            recording.active.add(compiled, grid, args, tail)

    def _packed(self, compiled, call: list):
        """``(Packed, address slots, integer slots)`` of a reused kernel (see :meth:`Packed.resolve`:
        a call's ``ptrs`` and ``ints`` in the key's order), or False where it goes through Triton."""
        packed = pack(compiled, call)
        if packed is None:
            return False
        return (packed, *packed.resolve([(i, j, 0) for j, i in enumerate(self._tensor_positions)],
                                        [(i, j) for j, i in enumerate(self._loose_positions)]))

    def _learn(self, args: tuple) -> None:
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        # (int subclasses too: recording.Offset)
        loose = [i for i, a in enumerate(args) if isinstance(a, int) and type(a) is not bool and i in self._no_spec]
        exact = [i for i in range(len(args)) if i not in tensors and i not in loose]
        self._tensor_positions, self._loose_positions = tensors, loose
        self._pattern = (len(args), _getter(tensors), _getter(loose), _getter(exact))


def _hooked(hook) -> bool:
    """Whether a launch hook is set (newer Triton keeps a chain of hooks that may be empty)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def hooks_set() -> bool:
    """Whether Triton's launch hooks (profilers) are set: launches then go through Triton."""
    return _knobs is not None and (_hooked(_knobs.runtime.launch_enter_hook) or _hooked(_knobs.runtime.launch_exit_hook))


def run_compiled(compiled, grid: int, args: list, stream: int | None = None) -> None:
    """Launch ``compiled`` (a Triton ``CompiledKernel``) on ``(grid, 1, 1)`` programs with ``args``
    (every parameter in signature order, tensors as addresses) on ``stream`` (a raw CUDA stream;
    None: the current one). Launch hooks (profilers) go through Triton's runner."""
    if stream is None:
        stream = _raw_stream(_device())
    if hooks_set():
        compiled[(grid, 1, 1)](*args, stream=stream)
        return
    compiled.run(grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)


class _Driver:
    """``cuLaunchKernel`` and ``cuFuncGetParamInfo`` of the CUDA driver, called through ctypes without
    releasing the GIL (a :class:`Packed` buffer is written and launched by one thread at a time)."""

    def __init__(self):
        lib = ctypes.PyDLL("libcuda.so.1")
        # no argtypes (ctypes would convert all eleven arguments on every call): the caller passes
        # pointers as c_void_p and the dimensions as Python ints, which go as C ints
        self.launch = lib.cuLaunchKernel
        self.launch.restype = ctypes.c_int
        self.param_info = lib.cuFuncGetParamInfo  # (CUDA 12.4 drivers and later)
        self.param_info.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        self.param_info.restype = ctypes.c_int
        self.error_string = lib.cuGetErrorString
        self.error_string.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def params(self, function: int) -> list:
        """The byte size of each parameter of a loaded kernel, in order."""
        sizes, offset, size = [], ctypes.c_size_t(), ctypes.c_size_t()
        while len(sizes) < 4096 and self.param_info(function, len(sizes), ctypes.byref(offset), ctypes.byref(size)) == 0:
            sizes.append(size.value)
        return sizes

    def error(self, rc: int) -> str:
        text = ctypes.c_char_p()
        self.error_string(rc, ctypes.byref(text))
        return (text.value or b"unknown error").decode()


_driver = None
#: held while a :class:`Packed` buffer is written and launched: another thread launching the same
#: kernel with the same key would write the same slots
PACKED_LOCK = threading.Lock()


def _get_driver():
    """The :class:`_Driver`, or False where the driver lacks what it needs."""
    global _driver
    if _driver is None:
        try:
            _driver = _Driver()
        except Exception:  # (no libcuda, a driver without cuFuncGetParamInfo: Triton's launcher)
            _driver = False
    return _driver


#: the Triton signature types a slot takes (others: not packed), and how a float becomes its bits
_SLOT = {"i1": int, "i8": int, "i16": int, "i32": int, "i64": int, "u1": int, "u8": int, "u16": int, "u32": int,
         "u64": int, "fp32": "<f", "f32": "<f", "fp64": "<d"}


class Packed:
    """A compiled kernel's parameters as the driver takes them (``slots``: one 8-byte slot per
    parameter, little-endian, so an integer of any width is written as is), built once; a launch
    passes the same buffer. ``where[i]``: the slot of the call's argument ``i`` (-1: a constexpr)."""

    __slots__ = ("function", "block", "shared", "slots", "where", "params", "name", "driver")

    def __init__(self, driver, function: int, block: int, shared: int, where: list, values: list, name: str):
        self.driver, self.block, self.shared, self.where, self.name = driver, block, shared, where, name
        self.function = ctypes.c_void_p(function)
        self.slots = (ctypes.c_uint64 * max(len(values), 1))(*values)
        base = ctypes.addressof(self.slots)
        self.params = (ctypes.c_void_p * max(len(values), 1))(*(base + 8 * i for i in range(len(values))))

    def resolve(self, subs: list, positions: list) -> tuple:
        """Where a launch's new values go, resolved once: ``subs`` ``[(argument position, variable,
        offset)]`` (addresses) and ``positions`` ``[(argument position, index)]`` (other values)
        become :meth:`launch`'s ``[(slot, variable, offset)]`` and ``[(slot, index)]``."""
        where = self.where
        return [(where[i], variable, offset) for i, variable, offset in subs], [(where[i], j) for i, j in positions]

    def launch(self, grid: int, stream: int, addrs: list, subs: list, values: list, items: list) -> None:
        """Write the new values into the slots and launch, under :data:`PACKED_LOCK` (another thread
        may launch the same kernel with the same key): slot ``s`` of each ``(s, variable, offset)``
        in ``subs`` takes ``addrs[variable] + offset``, of each ``(s, j)`` in ``items``
        ``values[j]`` (both from :meth:`resolve`)."""
        slots = self.slots
        with PACKED_LOCK:
            for slot, variable, offset in subs:
                slots[slot] = addrs[variable] + offset
            for slot, j in items:
                slots[slot] = values[j]
            if grid <= 0:  # (as Triton: an empty grid launches nothing)
                return
            rc = self.driver.launch(self.function, grid, 1, 1, self.block, 1, 1, self.shared,
                                    ctypes.c_void_p(stream), self.params, None)
        if rc:
            raise RuntimeError(f"launching {self.name} failed: {self.driver.error(rc)} (CUDA error {rc})")


def pack(compiled, call: list, driver=None):
    """A :class:`Packed` launch of ``compiled`` (a Triton ``CompiledKernel``) with the values of
    ``call`` (every parameter in signature order, constexprs included, tensors as addresses), or
    None where the kernel must go through Triton's launcher: launch options our kernels never use
    (clusters, cooperative grids, PDL, scratch memory), parameter types other than pointers,
    integers and 32/64-bit floats, or a parameter list the loaded kernel does not confirm (the
    driver's ``cuFuncGetParamInfo``: Triton adds its two scratch pointers after ours)."""
    driver = driver or _get_driver()
    meta, src = getattr(compiled, "metadata", None), getattr(compiled, "src", None)
    signature = getattr(src, "signature", None)
    if not driver or meta is None or not isinstance(signature, dict) or len(signature) != len(call):
        return None
    if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False)
            or getattr(meta, "launch_pdl", False) or getattr(meta, "global_scratch_size", 0)
            or getattr(meta, "profile_scratch_size", 0) or getattr(meta, "shared", 0) > 227 * 1024):
        return None
    where, values, pointers = [], [], []
    for ty, value in zip(signature.values(), call):
        if ty == "constexpr":
            where.append(-1)
            continue
        if not isinstance(ty, str):  # (tuples, tensor descriptors)
            return None
        if ty.startswith("*"):
            value = 0 if value is None else value
        elif ty not in _SLOT:
            return None
        elif type(_SLOT[ty]) is str:  # a float: its bits
            value = int.from_bytes(struct.pack(_SLOT[ty], value), "little")
        if not isinstance(value, int):
            return None
        where.append(len(values))
        values.append(value & 0xFFFFFFFFFFFFFFFF)
        pointers.append(ty.startswith("*"))
    function = getattr(compiled, "function", None)
    if not function:
        return None
    # the loaded kernel's parameters: ours (the driver copies each one's size from the start of its
    # slot: any width up to 8 bytes reads the value written), then Triton's scratch pointers
    loaded = driver.params(function)
    ours, extra = loaded[:len(pointers)], loaded[len(pointers):]
    if (len(ours) != len(pointers) or len(extra) > 2 or any(s != 8 for s in extra)
            or any(s > 8 or (s != 8 and is_pointer) for s, is_pointer in zip(ours, pointers))):
        return None
    values += [0] * len(extra)  # (Triton's scratch pointers: null, as it passes them without scratch)
    return Packed(driver, function, 32 * meta.num_warps, meta.shared, where, values,
                  getattr(compiled, "name", "a Triton kernel"))


_LAUNCHERS: dict = {}


def launch(kernel, grid: int, *args, **kwargs) -> None:
    """``kernel[(grid,)](*args, **kwargs)`` through the kernel's :class:`Launcher`: runtime
    parameters by position, in order; constexprs and launch options (``num_warps``) by keyword."""
    runner = _LAUNCHERS.get(kernel)
    if runner is None:
        runner = _LAUNCHERS[kernel] = Launcher(kernel)
    runner(grid, *args, **kwargs)


__all__ = ["Launcher", "launch", "run_compiled", "pack", "Packed", "PACKED_LOCK", "hooks_set"]
