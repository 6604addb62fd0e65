"""Per-token, per-128-channel FP8 (e4m3) quantization inside the dispatch kernel.

For each group of 128 channels of a bf16 row: ``amax = max(|x|, 1e-4)``; the scale is
``amax / 448`` (or, with ``ROUND``, the next power of two at or above it), and the data is
``x * ((1 / amax) * 448)`` (or ``x * (1 / scale)``), rounded to nearest even with saturation at 448.
:func:`tritonep.reference.quantize_fp8` is the same recipe in torch; the results match bit for bit.

Worked example (one group): ``x = [1.0, -2.0, 0, ...]`` -> ``amax = 2``, ``scale = 2/448``,
``data = [224, -448, 0, ...]``; with ``ROUND``: ``scale = 2^-7 = 1/128``, ``data = [128, -256, 0, ...]``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRET
from .primitives import device_fn


if INTERPRET:

    def to_fp8e4m3(x):
        """fp32 -> float8_e4m3fn, round to nearest even, saturating at 448 (the interpreter's own
        cast truncates). Normal values keep 3 of the 23 mantissa bits with the RNE carry trick;
        subnormals (below 2^-6) are multiples of 2^-9."""
        bits = x.to(tl.int32, bitcast=True)
        sign = tl.where(bits < 0, 0x80, 0)
        mag = bits & 0x7FFFFFFF
        normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
        y = tl.abs(x) * 512.0
        f = tl.floor(y)
        d = y - f
        fi = f.to(tl.int32)
        sub = fi + ((d > 0.5) | ((d == 0.5) & ((fi & 1) == 1))).to(tl.int32)
        code = tl.minimum(tl.where(tl.abs(x) < 0.015625, sub, normal), 0x7E)
        return (code | sign).to(tl.uint8).to(tl.float8e4nv, bitcast=True)

else:

    @triton.jit
    def to_fp8e4m3(x):
        """fp32 -> float8_e4m3fn (cvt.rn.satfinite)."""
        return x.to(tl.float8e4nv)


@device_fn
def pow2_ceil(s):
    """The smallest power of two >= ``s`` (positive, normal fp32), exactly, from the bits."""
    bits = s.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (e << 23).to(tl.float32, bitcast=True)


@device_fn
def quantize_groups(v, ROUND: tl.constexpr):
    """``v`` ``[G, 128]`` fp32 (one row's groups) -> ``(fp8 [G, 128], scales [G] float32)``."""
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-4)
    # IEEE division (div_rn) and torch's order of operations: torch evaluates ``448 / amax`` as
    # ``reciprocal(amax) * 448``, and DeepEP's cast recipe inherits that rounding
    scale = tl.math.div_rn(amax, 448.0)
    if ROUND:
        scale = pow2_ceil(scale)
        mult = tl.math.div_rn(1.0, scale)
    else:
        mult = tl.math.div_rn(1.0, amax) * 448.0
    return to_fp8e4m3(v * tl.expand_dims(mult, 1)), scale


@device_fn
def quantize_row(src, dst_addr, off_sf, hidden, ROUND: tl.constexpr, GROUPS: tl.constexpr):
    """Quantize one bf16 row (``src``: pointer to ``hidden`` bf16) into a dispatch slot at raw
    address ``dst_addr``: ``hidden`` fp8 bytes, then ``hidden / 128`` float32 scales at ``off_sf``."""
    num_groups = hidden // 128
    # [GROUPS, 128] built by reshape, not slicing: slicing breaks under the interpreter when triton
    # was imported before tritonep switched it on
    block = tl.reshape(tl.arange(0, GROUPS * 128), (GROUPS, 128))
    for g0 in range(0, num_groups, GROUPS):
        offs = g0 * 128 + block
        m = offs < hidden
        offs_g = g0 + tl.arange(0, GROUPS)
        q, scale = quantize_groups(tl.load(src + offs, mask=m, other=0.0).to(tl.float32), ROUND)
        tl.store((dst_addr + offs).to(tl.pointer_type(tl.float8e4nv)), q, mask=m)
        tl.store((dst_addr + off_sf + offs_g * 4).to(tl.pointer_type(tl.float32)), scale, mask=offs_g < num_groups)
