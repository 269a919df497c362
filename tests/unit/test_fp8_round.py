"""fp8_round / bf16_round against ml_dtypes (the independent reference), bit for bit, in graph mode."""

from __future__ import annotations

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.precision.fp8 import bf16_round, fp8_round

DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def grid_values(dtype) -> np.ndarray:
    """Every finite non-negative value of the format, from all 256 byte patterns."""
    values = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    return np.unique(np.abs(values[np.isfinite(values)]))


def sample_values(fmt: str, n: int = 1_000_000) -> np.ndarray:
    """n log-uniform values from below half the smallest subnormal to beyond overflow, both signs, plus
    every grid value, every exact midpoint (ties) and its float32 neighbours, +-0, +-inf, NaN."""
    dtype = DTYPES[fmt]
    lo, hi = (-12, 10) if fmt == "e4m3" else (-19, 17)
    rng = np.random.default_rng(0)
    x = (np.exp2(rng.uniform(lo, hi, n)) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    grid = grid_values(dtype)
    mid = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
    special = [0.0, np.inf, np.nan, 464.0, 464.0001, 480.0, 61439.0, 61440.0, 65536.0, 1e-30, 1e-45, 3e38]
    extra = np.concatenate([grid, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf)),
                            np.asarray(special, np.float32)]).astype(np.float32)
    return np.concatenate([x, extra, -extra])


def mismatches(y: np.ndarray, ref: np.ndarray) -> int:
    """Count of positions that differ in value or sign bit (NaN matches NaN)."""
    same = ((y == ref) & (np.signbit(y) == np.signbit(ref))) | (np.isnan(y) & np.isnan(ref))
    return int((~same).sum())


@ms.jit
def round_e4m3(x):
    return fp8_round(x, "e4m3", saturate=False)


@ms.jit
def round_e5m2(x):
    return fp8_round(x, "e5m2", saturate=False)


@ms.jit
def round_e4m3_sat(x):
    return fp8_round(x, "e4m3")


@ms.jit
def round_e5m2_sat(x):
    return fp8_round(x, "e5m2")


JIT = {("e4m3", False): round_e4m3, ("e5m2", False): round_e5m2, ("e4m3", True): round_e4m3_sat,
       ("e5m2", True): round_e5m2_sat}


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_non_saturating_equals_ml_dtypes_cast_bit_for_bit(fmt):
    x = sample_values(fmt)
    assert x.size > 1_000_000
    ref = x.astype(DTYPES[fmt]).astype(np.float32)
    assert mismatches(JIT[fmt, False](Tensor(x)).asnumpy(), ref) == 0


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturating_equals_ml_dtypes_cast_of_clipped_input(fmt):
    x = sample_values(fmt)
    top = float(ml_dtypes.finfo(DTYPES[fmt]).max)
    clipped = np.where(np.isnan(x), x, np.clip(x, -top, top)).astype(np.float32)
    ref = clipped.astype(DTYPES[fmt]).astype(np.float32)
    y = JIT[fmt, True](Tensor(x)).asnumpy()
    assert mismatches(y, ref) == 0
    assert np.nanmax(np.abs(y)) == top  # +-inf and finite overflow saturate to +-max


def test_pynative_matches_graph_and_specials():
    x = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 464.0, -1e-30, 2.0 ** -10, 2.0 ** -9 * 1.5])
    y = fp8_round(Tensor(x), "e4m3", saturate=False).asnumpy()
    ref = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert mismatches(y, ref) == 0
    assert np.isnan(y[2]) and np.isnan(y[3])  # E4M3FN has no inf: overflow is NaN
    assert np.signbit(y[1]) and np.signbit(y[6])  # -0.0 and negative underflow keep the sign
    y5 = fp8_round(Tensor(x), "e5m2", saturate=False).asnumpy()
    assert y5[2] == np.inf and y5[3] == -np.inf
    sat = fp8_round(Tensor(x), "e4m3").asnumpy()
    assert sat[2] == 448.0 and sat[3] == -448.0 and np.isnan(sat[4])


@pytest.mark.parametrize("fmt, rtol, atol", [("e4m3", 0.125, 0.0675), ("e5m2", 0.25, 0.125)])
@pytest.mark.parametrize("scale", [0.375, 1.0, 3.5])
def test_round_trip_of_uniform_values_within_tolerance(fmt, rtol, atol, scale):
    x = (np.random.default_rng(1).uniform(-1, 1, 100_000) * scale).astype(np.float32)
    y = fp8_round(Tensor(x), fmt).asnumpy()
    np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)
    if fmt == "e4m3":
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        sqnr = 10 * np.log10(np.sum(x64 ** 2) / np.sum((x64 - y64) ** 2))
        assert sqnr >= 25.0


def test_bf16_round_equals_ml_dtypes():
    rng = np.random.default_rng(2)
    base = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-30, 30, 200_000))).astype(np.float32)
    ties = (np.arange(2 ** 16, dtype=np.uint32) << 7 | np.uint32(0x3F800040)).view(np.float32)  # exact halves
    special = np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, 3.3e38, 1e-40, -1e-42])
    x = np.concatenate([base, ties, np.nextafter(ties, np.float32(0)), special]).astype(np.float32)
    ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert mismatches(bf16_round(Tensor(x)).asnumpy(), ref) == 0


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="e4m3, e5m2"):
        fp8_round(Tensor(np.ones(2, np.float32)), "e3m4")


def fused_ops():
    from ascend_llm.precision.cpu_kernel import build_bf16_op, build_cast_op, fused_available
    from ascend_llm.precision.fp8 import FORMATS

    if not fused_available("CPU"):
        pytest.skip("no C++ compiler: the fused CPU kernels are not built")
    return {name: build_cast_op(spec) for name, spec in FORMATS.items()}, build_bf16_op()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale", [1.0, 3.7])
def test_fused_cpu_cast_equals_ml_dtypes_and_counts_exactly(fmt, scale):
    casts, _ = fused_ops()
    x = sample_values(fmt)
    top = float(ml_dtypes.finfo(DTYPES[fmt]).max)
    with np.errstate(over="ignore", invalid="ignore"):
        xs = x * np.float32(scale)
    clipped = np.where(np.isnan(xs), xs, np.clip(xs, -top, top)).astype(np.float32)
    q, stats = ms.jit(casts[fmt])(Tensor(x), Tensor(np.float32(scale)))
    assert mismatches(q.asnumpy(), clipped.astype(DTYPES[fmt]).astype(np.float32)) == 0
    half_subnormal = float(np.abs(grid_values(DTYPES[fmt])[1])) / 2
    with np.errstate(invalid="ignore"):
        expected = [np.nanmax(np.abs(x)), np.mean(np.abs(xs) > top),
                    np.mean((x != 0) & (np.abs(xs) <= half_subnormal))]
    np.testing.assert_array_equal(stats.asnumpy(), np.float32(expected))


def test_fused_cpu_bf16_rounding_equals_ml_dtypes():
    _, bf16_op = fused_ops()
    with np.errstate(over="ignore"):
        x = sample_values("e5m2") * np.float32(1e3)
    ref = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert mismatches(ms.jit(bf16_op)(Tensor(x)).asnumpy(), ref) == 0
