"""Checks of Engram (``engram_write`` / ``engram_fetch``), shared by the CPU and GPU tests: every
rank's table written, rows fetched by global id from every rank's host memory, equal to the
reference ``cat(all tables)[indices].view(n_tok, -1)`` bit for bit, FP8 scale factors in both
layouts; an id outside the table gives a row of zeros."""
from __future__ import annotations

import torch


def table_of(seed: int, q: int, num_entries: int, hidden: int, fp8: bool):
    """Rank ``q``'s table ``[num_entries, H]`` and its scale factors ``[num_entries, H / 128]``."""
    g = torch.Generator().manual_seed(seed * 100 + q)
    x = torch.randn((num_entries, hidden), generator=g)
    sf = torch.rand((num_entries, max(hidden // 128, 1)), generator=g)
    return (x.to(torch.float8_e4m3fn) if fp8 else x.to(torch.bfloat16)), sf


def reference_fetch(tables: list, indices: torch.Tensor) -> torch.Tensor:
    """``cat(tables)[indices].view(n_tok, -1)``; ids outside the table give zeros."""
    table = torch.cat(tables)
    ids = indices.flatten().long()
    valid = (ids >= 0) & (ids < table.shape[0])
    rows = table[ids.clamp(0, table.shape[0] - 1)].view(torch.uint8)
    rows = torch.where(valid[:, None], rows, 0).view(table.dtype)
    return rows.view(indices.shape[0], -1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu().contiguous().view(torch.uint8),
                                              b.cpu().contiguous().view(torch.uint8))


def run_engram_case(buf, seed: int, num_entries: int, hidden: int, n_tok: int, per_tok: int, fp8: bool) -> None:
    R, r, dev = buf.num_ranks, buf.rank_idx, buf.device
    tables = [table_of(seed, q, num_entries, hidden, fp8) for q in range(R)]
    sf_all = torch.cat([t[1] for t in tables]).to(dev) if fp8 else None
    buf.engram_write(tables[r][0].to(dev), sf_all)
    g = torch.Generator().manual_seed(seed * 7 + r)
    indices = torch.randint(0, R * num_entries, (n_tok, per_tok), generator=g, dtype=torch.int32)
    indices[0, 0] = -1  # outside the table: zeros
    want = reference_fetch([t[0] for t in tables], indices)
    for col_major in (False, True) if fp8 else (False,):
        data, sf = buf.engram_fetch(indices.to(dev), use_tma_aligned_col_major_sf=col_major)()
        if not _same(data, want):
            raise AssertionError(f"rank {r}: engram_fetch data differs from the reference (fp8={fp8})")
        if fp8:
            want_sf = reference_fetch([t[1] for t in tables], indices)
            if not _same(sf, want_sf):
                raise AssertionError(f"rank {r}: engram_fetch scale factors differ (col_major={col_major})")
            if col_major and sf.stride() != (1, -(-n_tok // 4) * 4):
                raise AssertionError(f"rank {r}: column-major scale factors have strides {sf.stride()}")
        else:
            assert sf is None
