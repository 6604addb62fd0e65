"""The in-kernel FP8 cast against torch: e4m3 rounding (ties, subnormals, saturation), power-of-two
scales, and a whole row against reference.quantize_fp8."""
import pytest
import torch
import triton
import triton.language as tl

from tritonep import reference
from tritonep.kernels.quant import pow2_ceil, quantize_row, to_fp8e4m3


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, to_fp8e4m3(tl.load(x_ptr + offs)))


@triton.jit
def _pow2_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, pow2_ceil(tl.load(x_ptr + offs)))


@triton.jit
def _row_kernel(x_ptr, out_ptr, off_sf, hidden, ROUND: tl.constexpr, GROUPS: tl.constexpr):
    quantize_row(x_ptr, out_ptr.to(tl.int64, bitcast=True), off_sf, hidden, ROUND, GROUPS)


def _pad(x, n):
    out = torch.zeros(n, dtype=x.dtype)
    out[: x.numel()] = x
    return out


def test_e4m3_rounding_matches_torch():
    # every representable value, the midpoints between neighbours (ties to even), and random values
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[1:] + codes[:-1]) / 2
    rnd = torch.randn(6000) * torch.logspace(-4, 2.6, 6000)
    x = torch.cat([codes, -codes, mids, -mids, rnd.clamp(-448, 448), torch.tensor([448.0, -448.0, 0.0, -0.0])])
    n = triton.next_power_of_2(x.numel())
    xp = _pad(x, n)
    y = torch.empty(n, dtype=torch.float8_e4m3fn)
    _cast_kernel[(1,)](xp, y, n)
    want = xp.to(torch.float8_e4m3fn)
    bad = (y.view(torch.uint8) != want.view(torch.uint8)).nonzero().flatten()
    assert len(bad) == 0, f"{len(bad)} mismatches, e.g. {xp[bad[:5]].tolist()}"


def test_pow2_ceil_is_exact():
    x = torch.cat([torch.logspace(-20, 20, 1000, base=2.0), 2.0 ** torch.arange(-30, 30, dtype=torch.float32)])
    n = triton.next_power_of_2(x.numel())
    xp = _pad(x, n) + (torch.arange(n) >= x.numel()).float()  # pad with 1.0
    y = torch.empty(n)
    _pow2_kernel[(1,)](xp, y, n)
    mant, exp = torch.frexp(xp)
    want = torch.ldexp(torch.ones(n), torch.where(mant == 0.5, exp - 1, exp))
    assert torch.equal(y, want)


@pytest.mark.parametrize("round_scale", [False, True])
@pytest.mark.parametrize("hidden", [128, 896, 7168])
def test_row_matches_reference(round_scale, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(1, hidden, generator=g) * torch.logspace(-3, 2, hidden)).to(torch.bfloat16)
    x[0, 256:384] = 0  # a group of zeros: amax is clamped to 1e-4
    P = hidden // 128
    out = torch.zeros(hidden + 4 * P, dtype=torch.uint8)
    _row_kernel[(1,)](x, out, hidden, hidden, ROUND=round_scale, GROUPS=8)
    data, scale = reference.quantize_fp8(x, round_scale)
    assert torch.equal(out[:hidden], data.view(torch.uint8)[0])
    assert torch.equal(out[hidden:].view(torch.float32), scale[0])
