"""Triton kernels, one file per family, and ``primitives.py`` for every memory-ordering operation.

Importing this package decides how kernels run: compiled for the GPU when CUDA is available,
otherwise under the Triton interpreter (``TRITON_INTERPRET=1`` is set here, before any kernel is
decorated, so a user never has to export it). The interpreter runs the same kernel source on CPU
tensors and on raw addresses into POSIX shared memory.

Interpreter rule that every kernel here respects: it runs a launch's programs one after another,
so a program may only wait for what other ranks' programs with the same or a lower program id
produce before they wait themselves. Each launch therefore either only produces (pushes data and
signals) or only waits on what earlier launches of the peers produced.
"""
from __future__ import annotations

import os

from ..envs import interpreter_requested, no_gpu

INTERPRET: bool = interpreter_requested() or no_gpu()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    # The interpreter checks every int32 add/mul for overflow (about half of CPU kernel time);
    # compiled GPU kernels never do, so turn it off to run the same arithmetic.
    try:
        import dataclasses

        from triton.runtime import interpreter as _interpreter

        _builder = _interpreter.interpreter_builder
        _builder.options = dataclasses.replace(_builder.options, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):
        pass

    def _interpret_triton_stdlib() -> None:
        """If triton was imported before the switch above, its standard-library helpers
        (``tl.max``, ``tl.sum``, ``tl.cumsum``, ...) were built as compiled-mode JIT functions,
        which the interpreter cannot call. Re-wrap them so that import order never matters."""
        try:
            import triton.language as tl
            import triton.language.standard as standard
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
        except ImportError:
            return
        for module in (tl, standard, tl.math):
            for name, obj in list(vars(module).items()):
                if isinstance(obj, JITFunction):
                    setattr(module, name, InterpretedFunction(obj.fn))

    _interpret_triton_stdlib()


def block_size(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)``: a block (constexpr) size for ``n`` items.

    Plain Python on purpose: ``triton.next_power_of_2`` and ``triton.cdiv`` are
    ``ConstexprFunction`` objects in recent Triton and cost microseconds per host call; a dispatch
    computes about ten block sizes."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host integers (see :func:`block_size` for why not ``triton.cdiv``)."""
    return -(-a // b)
