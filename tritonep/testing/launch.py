"""Spawn a group of ranks on this machine and run one function in each.

``parallel_launch(world_size, fn, *args)`` starts ``world_size`` processes (``spawn``), joins them
into a process group (NCCL with one GPU each when ``backend="nccl"``; ``"shared-gpu"``: gloo, every
rank on GPU 0 with ``TRITONEP_DEVICE=cuda``, for GPU tests on a one-GPU machine; else gloo on CPUs), calls
``fn(info, *args)`` in every rank and returns the ranks' return values. A rank that raises makes
the launcher raise with that rank's traceback; a rank still running after ``timeout`` seconds is
killed and reported: a test never hangs.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

#: Keep NVLink multicast off everywhere: it is not needed, and some shared GPU hosts forbid it.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclasses.dataclass
class ProcessGroupInfo:
    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def group(self):
        import torch.distributed as dist

        return dist.group.WORLD


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"


def _worker(rank, world_size, backend, init_file, pg_timeout, results, fn, args):
    import torch.distributed as dist

    os.environ.update(SAFE_ENV)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    elif backend == "shared-gpu":
        os.environ["TRITONEP_DEVICE"] = "cuda"
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
    try:
        dist.init_process_group("gloo" if backend == "shared-gpu" else backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout),
                                **({"device_id": device} if backend == "nccl" else {}))
        out = fn(ProcessGroupInfo(rank, world_size, device, backend), *args)
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def parallel_launch(world_size: int, fn, *args, backend: str | None = None, timeout: float = 600.0,
                    pg_timeout: float = 120.0, allow_failures: bool = False):
    """Run ``fn(info, *args)`` on ``world_size`` spawned ranks; return ``[result of rank 0, ...]``.

    With ``allow_failures=True`` a failing rank's entry is ``("error", traceback)`` instead of raising
    (for tests where a rank is meant to fail).
    """
    backend = backend or default_backend()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="tritonep_launch_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world_size, backend, init_file, pg_timeout, results, fn, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        outcome: dict = {}
        deadline = time.monotonic() + timeout
        while len(outcome) < world_size and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.5)
                outcome[rank] = (status, value)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in outcome and not p.is_alive() and p.exitcode not in (0, None):
                        outcome[r] = ("error", f"rank {r} died with exit code {p.exitcode}")
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in stuck:
            procs[r].kill()
            procs[r].join()
    if stuck:
        raise TimeoutError(f"parallel_launch: ranks {stuck} still running after {timeout:g} s (killed)")
    missing = [r for r in range(world_size) if r not in outcome]
    if missing:
        raise RuntimeError(f"parallel_launch: ranks {missing} exited without a result")
    if not allow_failures:
        errors = [(r, v) for r, (s, v) in sorted(outcome.items()) if s == "error"]
        if errors:
            text = "\n".join(f"--- rank {r} ---\n{v}" for r, v in errors)
            raise RuntimeError(f"parallel_launch: {len(errors)} of {world_size} ranks failed\n{text}")
        return [outcome[r][1] for r in range(world_size)]
    return [outcome[r][1] if outcome[r][0] == "ok" else ("error", outcome[r][1]) for r in range(world_size)]
