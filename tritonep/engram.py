"""Engram (DeepEP V2's remote-storage fetch, spec section 5): an embedding table whose rows live in
the host memory of the ranks of one host, fetched into the buffer's GPU area by entry id.

Storage: every rank's ``num_cpu_bytes`` are a POSIX shared-memory segment mapped by every rank
of the host (and page-locked for the GPU), so a peer's rows are read without its CPU or its SMs;
a table larger than GPU memory fits as long as host memory holds it. ``engram_write`` copies this
rank's ``[num_entries, H]`` rows into its segment; global entry ``g`` is rank ``g // num_entries``'s
row ``g % num_entries``. ``engram_fetch`` gathers the rows of ``indices`` ``[n_tok, e]`` into the
first bytes of the buffer's GPU area with a kernel (:mod:`tritonep.kernels.engram`; it reads host
memory over PCIe and takes SMs while it runs; DeepEP reads by RDMA with 0 SMs) and returns a
hook; the hook returns ``(data [n_tok, e * H], sf [n_tok, e * P] or None)``, views that the
buffer's next call overwrites. FP8 scale factors come from the replicated ``sf`` of
``engram_write`` (a torch gather).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import sizing


def split_bytes(num_bytes, num_cpu_bytes) -> tuple:
    """DeepEP's ``num_bytes`` counts the Engram storage too: ``(GPU bytes or None, CPU bytes)``."""
    if not isinstance(num_cpu_bytes, int) or num_cpu_bytes < 0 or num_cpu_bytes % sizing.ALIGNMENT:
        raise ValueError(f"num_cpu_bytes ({num_cpu_bytes!r}) must be a non-negative multiple of {sizing.ALIGNMENT}")
    if num_cpu_bytes and isinstance(num_bytes, int):
        if num_bytes <= num_cpu_bytes:
            raise ValueError(f"num_bytes ({num_bytes}) counts the GPU part and num_cpu_bytes ({num_cpu_bytes}): "
                             "it must be larger (get_engram_storage_size_hint gives both parts)")
        return num_bytes - num_cpu_bytes, num_cpu_bytes
    return num_bytes, num_cpu_bytes


class Store:
    """The host-memory table of one buffer (built by the first ``engram_write``)."""

    def __init__(self, group, num_cpu_bytes: int, device: torch.device):
        from .heap.shm import ShmHeap

        self.device = device
        self.shm = ShmHeap(group, num_cpu_bytes, 0)
        self.addrs = list(self.shm.data_addrs)
        if device.type == "cuda":
            from .copy_engine import register_host

            self.addrs = [register_host(a, num_cpu_bytes) for a in self.shm.data_addrs]
        self.ptrs = torch.tensor(self.addrs, dtype=torch.int64, device=device)
        self.num_entries, self.dtype, self.hidden, self.sf = 0, None, 0, None
        # programs of the gather: 4 per SM (CPU ranks: 2)
        self.programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
            else 2

    def destroy(self) -> None:
        if self.device.type == "cuda":
            from .copy_engine import unregister_host

            for a in self.shm.data_addrs:
                unregister_host(a)
        self.shm.destroy()


class EngramMixin:
    """``ElasticBuffer``'s Engram methods (spec section 5)."""

    _engram = None
    num_cpu_bytes = 0

    @staticmethod
    def get_engram_storage_size_hint(num_entries: int, hidden: int, num_max_fetched_entries: int,
                                     dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
        """``(GPU bytes, CPU bytes)``: the fetch landing area and this rank's table (scales not counted)."""
        e = sizing.align(hidden * dtype.itemsize, 32)
        return sizing.align(e * num_max_fetched_entries, sizing.ALIGNMENT), sizing.align(e * num_entries,
                                                                                         sizing.ALIGNMENT)

    def engram_write(self, storage: torch.Tensor, sf: torch.Tensor | None = None) -> None:
        """Collective: this rank's table ``storage`` ``[num_entries, H]`` (bf16 or float8_e4m3fn, on the
        buffer's device, contiguous; the same ``num_entries`` on every rank) into its host memory.
        ``sf`` (FP8 only, and then required): every rank's scale factors ``[R * num_entries, P]``
        (4-byte elements), kept by reference."""
        self._check_alive()
        if not isinstance(storage, torch.Tensor) or storage.dim() != 2 or storage.device != self.device:
            raise ValueError(f"engram_write: storage must be a 2-D tensor on {self.device}")
        if storage.dtype not in (torch.bfloat16, torch.float8_e4m3fn) or not storage.is_contiguous():
            raise ValueError(f"engram_write: storage must be contiguous bf16 or float8_e4m3fn, got {storage.dtype}")
        row_bytes = storage.shape[1] * storage.element_size()
        if row_bytes % 16:
            raise ValueError(f"engram_write: a row is {row_bytes} bytes; it must be a multiple of 16")
        if storage.nbytes > self.num_cpu_bytes:
            raise ValueError(f"engram_write: storage has {storage.nbytes} bytes, num_cpu_bytes is {self.num_cpu_bytes}"
                             " (get_engram_storage_size_hint)")
        fp8 = storage.dtype == torch.float8_e4m3fn
        if fp8 != (sf is not None):
            raise ValueError("engram_write: sf must be given for float8_e4m3fn storage, and only then")
        R = self.num_ranks
        if sf is not None and (sf.dim() != 2 or sf.device != self.device or not sf.is_contiguous()
                               or sf.element_size() != 4 or sf.shape[0] != R * storage.shape[0]):
            raise ValueError(f"engram_write: sf must be [{R} * num_entries, P] contiguous 4-byte on {self.device}")
        sizes: list = [None] * R
        dist.all_gather_object(sizes, tuple(storage.shape), group=self.group)
        if len(set(sizes)) != 1:
            raise ValueError(f"engram_write: every rank must write the same [num_entries, H]; got {sizes}")
        if self._engram is None:
            if getattr(self._backend, "heap", None) is None:
                raise NotImplementedError(f"Engram needs the ranks of one host (the symmetric backend); this buffer "
                                          f"runs {self.backend!r}")
            self._engram = Store(self.group, self.num_cpu_bytes, self.device)
        store = self._engram
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # no peer is reading the old rows
        store.shm.data[:storage.nbytes].copy_(storage.view(torch.uint8).flatten())
        store.num_entries, store.dtype, store.hidden, store.sf = storage.shape[0], storage.dtype, storage.shape[1], sf
        dist.barrier(group=self.group)  # every rank's rows are in place

    def engram_fetch(self, indices: torch.Tensor, num_qps: int = 0, use_tma_aligned_col_major_sf: bool = False):
        """Gather the rows of ``indices`` ``[n_tok, e]`` int32 (global entry ids) on the current stream;
        returns a hook that returns ``(data [n_tok, e * H], sf [n_tok, e * P] or None)`` (token ``t``'s
        entries side by side in index order; ``sf`` row-major, or with ``use_tma_aligned_col_major_sf``
        strides ``(1, align(n_tok, 4))``). ``num_qps`` is accepted and unused."""
        self._check_alive()
        store = self._engram
        if store is None or not store.num_entries:
            raise ValueError("engram_fetch: call engram_write first")
        if (not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.dtype != torch.int32
                or indices.device != self.device or not indices.is_contiguous()):
            raise ValueError(f"engram_fetch: indices must be [n_tok, e] int32, contiguous, on {self.device}")
        n_tok, e = indices.shape
        row_bytes = store.hidden * store.dtype.itemsize
        if n_tok * e * row_bytes > self.num_bytes:
            raise ValueError(f"engram_fetch: {n_tok * e} rows of {row_bytes} bytes exceed the GPU part "
                             f"({self.num_bytes} bytes)")
        from .kernels import engram as kernels  # (importing tritonep must not pick the Triton mode yet)

        heap = self._backend.heap
        words = heap.data[:n_tok * e * row_bytes].view(torch.int32)
        kernels.gather(indices=indices, src_ptrs=store.ptrs, dst_words=words, num_entries=store.num_entries,
                       num_ranks=self.num_ranks, row_words=row_bytes // 4, programs=store.programs)
        data = heap.data[:n_tok * e * row_bytes].view(store.dtype).view(n_tok, e * store.hidden)
        sf = None
        if store.sf is not None:
            ids = indices.flatten().long()
            valid = (ids >= 0) & (ids < store.sf.shape[0])
            rows = torch.where(valid[:, None], store.sf[ids.clamp(0, store.sf.shape[0] - 1)], 0)
            P = store.sf.shape[1]
            if use_tma_aligned_col_major_sf:
                col = torch.zeros((e * P, sizing.align(n_tok, 4)), dtype=store.sf.dtype, device=self.device)
                col[:, :n_tok] = rows.view(n_tok, e * P).T
                sf = col.T[:n_tok]
            else:
                sf = rows.view(n_tok, e * P)
        return lambda: (data, sf)
