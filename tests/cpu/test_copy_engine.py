"""copy_engine.copy_rows: strided rows into dense ones (its CPU path; the GPU path is the same call
through cudaMemcpy2DAsync, run by the GPU tests whenever a synced dispatch copies rows out)."""
import pytest
import torch

from tritonep import copy_engine


def test_strided_rows_into_dense_rows():
    g = torch.Generator().manual_seed(3)
    heap = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
    src = heap[64:]  # a view with its own storage offset, like the heap's data area
    pitch, row, rows, offset = 96, 80, 7, 200
    dst = torch.full((rows, row), 0xAB, dtype=torch.uint8)
    copy_engine.copy_rows(dst, src, offset, pitch, rows, row)
    want = torch.stack([src[offset + i * pitch:offset + i * pitch + row] for i in range(rows)])
    assert torch.equal(dst, want)
    before = dst.clone()
    copy_engine.copy_rows(dst[:0], src, offset, pitch, 0, row)  # nothing to copy: nothing touched
    assert torch.equal(dst, before)


def test_missing_runtime_names_the_switch(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this process has the CUDA runtime")
    monkeypatch.setattr(copy_engine, "_lib", None)
    with pytest.raises(RuntimeError, match="copy_engine_min_bytes=-1"):
        copy_engine.cudart()
