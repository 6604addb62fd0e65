import pytest

from tritonep import sizing
from tritonep.kernels import combine_dense


def test_deepep_examples():
    # spec 1.3: H=7168, T=4096, k=0 (sized for 32), BF16, one node of 8
    assert sizing.get_buffer_size_hint(8, 4096, 7168) == 484_442_112
    # spec 1.3's hybrid example (2 hosts x 8 ranks), and direct mode across hosts (send areas too)
    assert sizing.get_buffer_size_hint(16, 4096, 7168, num_scaleout_ranks=2, num_nvlink_ranks=8) == 1_233_125_376
    one_host = sizing.get_buffer_size_hint(16, 4096, 7168)
    assert sizing.get_buffer_size_hint(16, 4096, 7168, num_nvlink_ranks=8) > one_host
    assert sizing.get_buffer_size_hint(2, 1, 128) % sizing.ALIGNMENT == 0


@pytest.mark.parametrize("R", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("k", [1, 2, 8, 32])
@pytest.mark.parametrize("H", [128, 2048, 7168])
@pytest.mark.parametrize("fp8", [False, True])
def test_own_layout_fits_in_deepep_size(R, k, H, fp8):
    T = 512
    hint = sizing.get_buffer_size_hint(R, T, H, k, fp8)
    row = H * (1 if fp8 else 2)
    for expand in (False, True):
        assert sizing.dispatch_bytes(R, T, row, H // 128 if fp8 else 0, k, expand) <= hint
    assert sizing.combine_bytes(R, T, H, k) <= hint
    assert sizing.combine_bytes(R, T, H, k, per_slot=True) <= sizing.get_buffer_size_hint(
        R, T, H, k, fp8, allow_multiple_reduction=False)


def test_slot_parts_are_aligned():
    off_sf, off_meta, slot = sizing.dispatch_slot_offsets(7168, 56, 8)
    assert off_sf == 7168 and off_meta % 16 == 0 and slot % 16 == 0 and off_meta - off_sf >= 56 * 4
    off_w, cslot = sizing.combine_slot_offsets(7168, 8)
    assert off_w == 2 * 7168 and cslot == 2 * 7168 + 32


@pytest.mark.parametrize("R,T,row,packs,k", [(2, 8192, 7168, 56, 8), (8, 4096, 14336, 0, 8), (3, 24, 200, 3, 5)])
def test_row_dispatch_layout_fits_the_slot_budget(R, T, row, packs, k):
    row_pitch, aux_base, aux_pitch, off_sf, off_meta = sizing.dispatch_area(R, T, row, packs, k)
    # rows back to back (one dense copy per source when the row is a multiple of 16 bytes), every
    # part 16-byte aligned, the scales and metadata after all rows, in the interleaved layout's bytes
    assert row_pitch == -(-row // 16) * 16 and aux_base == R * T * row_pitch
    assert off_sf == 0 and off_meta >= packs * 4 and aux_pitch >= off_meta + (2 * k + 2) * 4
    assert all(v % 16 == 0 for v in (row_pitch, aux_base, aux_pitch, off_meta))
    assert aux_base + R * T * aux_pitch == sizing.dispatch_bytes(R, T, row, packs, k)
    combine_w_off, combine_total = combine_dense.dense_area(R, T, row // 2, k)
    assert combine_w_off % 16 == 0 and combine_total == combine_w_off + R * T * k * 4


def test_rejects_empty_sizes():
    with pytest.raises(ValueError, match="must be > 0"):
        sizing.get_buffer_size_hint(2, 0, 128)
