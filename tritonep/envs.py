"""Every ``TRITONEP_*`` environment variable, read in one place and parsed once.

Constructor arguments take precedence; these are the second source of configuration.
The README's "Environment variables" table lists exactly the fields of :class:`Envs`
(a test keeps the two in sync).
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


def _parse_int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


def _parse_tile(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value:
        parts = value.split("x")
        ok = len(parts) == 3 and all(p.isdigit() and int(p) > 0 for p in parts)
        tokens, words, warps = (int(p) for p in parts) if ok else (0, 0, 0)
        if not (ok and tokens % 16 == 0 and tokens & (tokens - 1) == 0 and words & (words - 1) == 0
                and warps in (1, 2, 4, 8, 16, 32)):
            raise ValueError(f"{name}={raw!r}: expected TOKENSxWORDSxWARPS (tokens a power of two >= 16, "
                             "4-byte words a power of two, warps 1-32), e.g. 32x256x8, or empty for the default")
    return value


def tile(value: str):
    """``"32x256x8"`` -> ``(32, 256, 8)``; ``""`` -> None."""
    return tuple(int(p) for p in value.split("x")) if value else None


BACKENDS = ("auto", "symmetric", "alltoall")
DEVICES = ("auto", "cuda")


@dataclasses.dataclass(frozen=True)
class Envs:
    #: Which dispatch/combine backend ``ElasticBuffer`` uses when its ``backend`` argument is None:
    #: ``auto`` (symmetric memory when every peer can map every other's memory, else all-to-all),
    #: ``symmetric`` or ``alltoall``.
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
    #: Default for ``exact_recv_alloc``: a synced dispatch waits for the counts before any row moves
    #: and allocates exact-size outputs. ``0``: rows move into worst-case outputs while the host
    #: reads the counts, and exact-size views of them are returned (one host round trip less before
    #: rows move, up to ``R * T`` rows held per output).
    TRITONEP_EXACT_RECV_ALLOC: bool = True
    #: Default for ``pipelined_combine``: a combine of non-expanded rows runs push and reduction in
    #: one launch, each tile of tokens reduced as soon as its rows are in (per-block flags). ``0``:
    #: push, then reduction, as two launches.
    TRITONEP_PIPELINED_COMBINE: bool = True
    #: Default for ``pipelined_dispatch``: the same for the dispatch's push and copy-out (off: slower
    #: on the H200 pair, see docs/benchmarks.md).
    TRITONEP_PIPELINED_DISPATCH: bool = False
    #: Default for ``copy_engine_min_bytes``: a dispatch whose host knows the received counts (synced,
    #: or cached from a synced handle) copies the received rows out of its receive slots with the
    #: copy engine (0 SMs) when they hold at least this many bytes; the SMs then move only scales
    #: and metadata. A combine (not expanded) sends its rows back with the copy engine when a rank
    #: may send this many bytes (``(R - 1) * T * hidden * 2``). ``-1``: never (the SMs copy everything).
    TRITONEP_COPY_ENGINE_MIN_BYTES: int = 16 << 20
    #: The combine sends its rows with the copy engine (see ``copy_engine_min_bytes``) only in groups
    #: of at most this many ranks. Measured at 8192 tokens, 24 SMs, in CUDA graphs: 2 ranks 403 us
    #: against 601 with SMs sending, 4 ranks 1781 against 1144 (docs/benchmarks.md, 2026-11-28).
    TRITONEP_COPY_ENGINE_COMBINE_MAX_RANKS: int = 2
    #: A cached dispatch of plain rows (bf16, or FP8 with the caller's scales) sends every token of a
    #: rank to every peer by the copy engine, in chunks with flags, and the receivers gather the
    #: rows the handle lists (0 SMs sending; same group and size rules as the copy-engine combine).
    #: Off by default until measured on GPUs.
    TRITONEP_COPY_ENGINE_DISPATCH: bool = False
    #: A dispatch whose received rows the copy engine moves out (``copy_engine_min_bytes``) does so
    #: chunk by chunk while its push still runs: the push counts each block of rows into the
    #: receiver's counters, and per chunk a one-program kernel on a side stream waits for them and
    #: writes scales and metadata, then the copy engine copies the rows. The push takes one program
    #: fewer than ``num_sms``. Off until measured on GPUs.
    TRITONEP_DISPATCH_COPY_OUT_OVERLAP: bool = False
    #: The dispatch push loads each tile of rows once and stores it to every rank it goes to (else
    #: one load per destination). On since 2026-11-29 on one-H200 measurements (push_probe); not yet
    #: timed over NVLink.
    TRITONEP_DISPATCH_FUSED_PUSH: bool = True
    #: The dispatch push loads each step's next columns before it stores the current ones (two steps
    #: of loads in flight per program). On since 2026-11-29 (one H200: 4-8 % less time at 2 ranks,
    #: the same at 8); not yet timed over NVLink.
    TRITONEP_DISPATCH_PUSH_PREFETCH: bool = True
    #: Tokens x 4-byte words x warps per step of the dispatch push, e.g. ``16x512x8`` (the default
    #: until 2026-11-29); empty: ``dispatch_rows.PUSH_TILE`` (32x256x8). A pipelined push keeps 16
    #: tokens (16x512x8 when empty).
    TRITONEP_DISPATCH_PUSH_TILE: str = ""
    #: In groups larger than ``TRITONEP_COPY_ENGINE_COMBINE_MAX_RANKS``, a combine (not expanded)
    #: whose layout fits sends its rows with SMs into the copy-engine combine's layout (rows by
    #: sender; half of the programs send, half reduce) instead of the pipelined combine. 8 % faster
    #: at 4 ranks in the benchmark; the GPU tests passed with it at 4 and 8 ranks (ranks sharing one
    #: H200, 2026-11-29). ``0``: the pipelined combine there.
    TRITONEP_SM_COPIED_COMBINE: bool = True
    #: Rows per copy of the copy-engine combine (a multiple of 64); 0: about an eighth of the largest
    #: region, at least 256 (``combine_rows.chunk_rows``).
    TRITONEP_COPY_ENGINE_CHUNK_ROWS: int = 0
    #: GPU kernel launches reuse the compiled kernel that Triton returned for the same argument
    #: specialization, skipping Triton's per-call argument binding (``kernels/launch.py``). ``0``:
    #: every launch goes through Triton (for A/B timing and debugging).
    TRITONEP_FAST_LAUNCH: bool = True
    #: Print buffer sizes and backend choice at construction.
    TRITONEP_DEBUG: bool = False


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
            kwargs[field.name] = _parse_int(field.name, raw)
        elif field.name == "TRITONEP_DISPATCH_PUSH_TILE":
            kwargs[field.name] = _parse_tile(field.name, raw)
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
