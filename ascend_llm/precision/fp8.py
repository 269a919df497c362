"""FP8 formats and bit-exact rounding with MindSpore ops (graph mode, CPU and Ascend).

E4M3FN (max 448, no infinities: overflow is NaN) and E5M2 (max 57344, overflow is inf), per the OCP 8-bit
floating point spec. `fp8_round(x, fmt)` returns float32 values exactly representable in `fmt`:
round-to-nearest-even, subnormals, NaN kept, and a TE-style saturating cast (`saturate=True`: finite
overflow and +-inf clamp to +-max). With `saturate=False` it equals an `ml_dtypes` cast-and-back bit for bit.

Casting to MindSpore's FP8 dtypes fails on CPU, and Ascend 910B (A2) / 910C (A3) have no FP8 arithmetic
(only Ascend 950 does), so FP8 here is an exact *numerics emulation*: values are rounded to the FP8 grid
and the GEMMs run on the FP8 values in bf16 (Ascend) or fp32 (CPU). It never makes 910B training faster.

How the rounding works, without bit views (`Tensor.view(int32)` is not allowed under jit):
- normal range: Veltkamp's split `c = x * (2**(23-m) + 1); hi = c - (c - x)` rounds a float32 to m+1
  significant bits with round-to-nearest-even (checked exhaustively over whole binades against ml_dtypes);
- subnormal range (|x| < 2**emin): fixed spacing, `round(x * 2**(m-emin)) * 2**(emin-m)` (ops.round is
  round-half-even and keeps the sign of zero); near 2**emin both branches agree, so the branch test may be
  inexact;
- |x| is clamped to 2**(emax+2) first so the split cannot overflow; NaN is restored at the end with a where
  (`ops.clamp`/`ops.minimum` map NaN to the bound on CPU; `copysign`/`signbit` lose -0.0 there).

`Fp8Dense`, `apply_fp8` and the scaling recipes live in `fp8_dense.py` and `scaling.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mindspore as ms
from mindspore import Tensor, ops


@dataclass(frozen=True)
class Fp8Format:
    """Constants of one FP8 format (OCP 8-bit floating point spec, v1.0): mantissa bits, exponent range of the
    normal numbers, largest finite value and what a non-saturating overflow gives."""

    name: str
    mantissa_bits: int
    min_exp: int  # exponent of the smallest normal number
    max_exp: int  # exponent of the largest finite number
    max_value: float
    overflow_value: float  # result of a non-saturating overflow: NaN (E4M3FN has no inf) or inf

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, 2**min_exp (E4M3: 2**-6, E5M2: 2**-14)."""
        return 2.0 ** self.min_exp

    @property
    def min_subnormal(self) -> float:
        """Smallest positive subnormal value, 2**(min_exp - mantissa_bits) (E4M3: 2**-9, E5M2: 2**-16)."""
        return 2.0 ** (self.min_exp - self.mantissa_bits)

    @property
    def split_constant(self) -> float:
        """Veltkamp's splitting constant 2**(23 - mantissa_bits) + 1: `c = x * K; c - (c - x)` rounds a float32 to
        mantissa_bits + 1 significant bits, round-to-nearest-even."""
        return float(2 ** (23 - self.mantissa_bits) + 1)


E4M3 = Fp8Format("e4m3", mantissa_bits=3, min_exp=-6, max_exp=8, max_value=448.0, overflow_value=math.nan)
E5M2 = Fp8Format("e5m2", mantissa_bits=2, min_exp=-14, max_exp=15, max_value=57344.0, overflow_value=math.inf)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}
FLOAT32_MAX = 3.4028234663852886e38


def get_format(fmt: str | Fp8Format) -> Fp8Format:
    """The format named `fmt` ("e4m3" or "e5m2"); runs at graph-compile time too, hence a plain ValueError."""
    if isinstance(fmt, Fp8Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: allowed: e4m3, e5m2")
    return FORMATS[fmt]


def round_to_grid(x: Tensor, small, spec: Fp8Format, saturate: bool, nan_source: Tensor) -> Tensor:
    """Core of the rounding. `small` marks |x| < min_normal (may be inexact near the boundary); NaN
    positions are taken from `nan_source` (x itself, or the unscaled tensor it came from)."""
    limit = 2.0 ** (spec.max_exp + 2)
    xc = ops.clamp(x, -limit, limit)
    c = xc * spec.split_constant
    normal = c - (c - xc)
    sub = ops.round(xc * (2.0 ** (spec.mantissa_bits - spec.min_exp))) * spec.min_subnormal
    q = ops.where(small, sub, normal)
    if saturate:
        q = ops.clamp(q, -spec.max_value, spec.max_value)
    elif math.isnan(spec.overflow_value):
        q = ops.where(ops.abs(q) > spec.max_value, math.nan, q)
    else:
        q = ops.where(q > spec.max_value, math.inf, ops.where(q < -spec.max_value, -math.inf, q))
    return ops.where(ops.isnan(nan_source), math.nan, q)


def fp8_round(x: Tensor, fmt: str | Fp8Format, saturate: bool = True) -> Tensor:
    """float32 values exactly representable in `fmt` ("e4m3" or "e5m2"): RNE, subnormals, NaN kept.

    saturate=True: finite overflow and +-inf become +-max (TransformerEngine's saturating cast).
    saturate=False: overflow becomes NaN (e4m3) or +-inf (e5m2), exactly like an ml_dtypes cast.
    """
    spec = get_format(fmt)
    x = x.astype(ms.float32)
    return round_to_grid(x, ops.abs(x) < spec.min_normal, spec, saturate, x)


def bf16_round(x: Tensor) -> Tensor:
    """float32 values rounded to bfloat16 (round-to-nearest-even) by a cast there and back.

    Used to emulate bf16 GEMM operands where the device has no bf16 MatMul (CPU); casts work there.
    """
    return x.astype(ms.bfloat16).astype(ms.float32)
