"""Every ``TRITONEP_*`` environment variable, read in one place and parsed once.

Only deployment settings live here (backend, device, timeouts, hosts, debug output); kernel choices are
:class:`tritonep.KernelConfig`. Constructor arguments take precedence. docs/configuration.md lists
exactly the fields of :class:`Envs` (a test keeps the two in sync).
"""
from __future__ import annotations

import dataclasses
import functools
import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of 1/0/true/false/yes/no/on/off")


def _parse_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: must be > 0")
    return value


BACKENDS = ("auto", "symmetric", "hybrid", "direct", "alltoall")
DEVICES = ("auto", "cuda")


@dataclasses.dataclass(frozen=True)
class Envs:
    #: Which dispatch/combine backend ``ElasticBuffer`` uses when its ``backend`` argument is None:
    #: ``auto`` (symmetric memory inside one host; across hosts ``hybrid``, or ``alltoall`` with
    #: ``allow_hybrid_mode=False``), ``symmetric``, ``alltoall`` or ``hybrid``.
    TRITONEP_BACKEND: str = "auto"
    #: Which device an ``ElasticBuffer`` works on: ``auto`` (the current CUDA device when the group
    #: is NCCL's, else the CPU, kernels under the Triton interpreter) or ``cuda`` (the current CUDA
    #: device whatever the group: e.g. several ranks sharing ONE GPU over a gloo group, for
    #: correctness tests on a one-GPU machine; their kernels time-slice, so never for timing).
    TRITONEP_DEVICE: str = "auto"
    #: Default for ``num_gpu_timeout_secs`` (waits inside kernels on other ranks).
    TRITONEP_GPU_TIMEOUT_SECS: float = 100.0
    #: Default for ``num_cpu_timeout_secs`` (host waits for the dispatch counts).
    TRITONEP_CPU_TIMEOUT_SECS: float = 300.0
    #: Ranks per host: ranks ``[kN, (k+1)N)`` form host ``k`` (their scale-up domain), and ranks of
    #: different hosts never map each other's memory, even on one machine. ``0``: from the host names.
    TRITONEP_SCALEUP_SIZE: int = 0
    #: Print buffer sizes and backend choice at construction.
    TRITONEP_DEBUG: bool = False


def _parse_count(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r}: must be >= 0")
    return value


def _read(environ) -> Envs:
    kwargs = {}
    for field in dataclasses.fields(Envs):
        raw = environ.get(field.name)
        if raw is None:
            continue
        if field.type == "bool":
            kwargs[field.name] = _parse_bool(field.name, raw)
        elif field.type == "float":
            kwargs[field.name] = _parse_float(field.name, raw)
        elif field.type == "int":
            kwargs[field.name] = _parse_count(field.name, raw)
        else:
            value = raw.strip().lower()
            choices = {"TRITONEP_BACKEND": BACKENDS, "TRITONEP_DEVICE": DEVICES}[field.name]
            if value not in choices:
                raise ValueError(f"{field.name}={raw!r}: expected one of {', '.join(choices)}")
            kwargs[field.name] = value
    return Envs(**kwargs)


@functools.lru_cache(maxsize=1)
def get_envs() -> Envs:
    """The process's settings, parsed at first use."""
    return _read(os.environ)


def parse_envs(environ) -> Envs:
    """Parse a mapping (for tests); does not touch the cached process settings."""
    return _read(environ)


def no_gpu() -> bool:
    """True when this process has no usable CUDA device (kernels then run under the Triton interpreter)."""
    import torch

    return not torch.cuda.is_available()


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE
