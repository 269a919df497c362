"""RTN quantization against an independent float64 NumPy reference (the grid formulas in quant/rtn.py's
docstring, written here with per-group reshapes), bit for bit, plus the error bound |w - deq| <= s/2."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.quant import QuantConfig
from ascend_llm.errors import ConfigError
from ascend_llm.quant.rtn import dequantize, quantize_rtn


def reference_rtn(w, bits, group, sym):
    out_f, in_f = w.shape
    group = in_f if group == -1 else group
    pad = (-in_f) % group
    wp = np.concatenate([w, np.full((out_f, pad), np.nan)], axis=1).reshape(out_f, -1, group)
    maxq = 2 ** bits - 1
    if sym:
        amax = np.nanmax(np.abs(wp), axis=2)
        scale = np.where(amax == 0, 1.0, amax / (2 ** (bits - 1) - 1))
        scale = np.maximum(scale, 2.0 ** -14).astype(np.float16).astype(np.float64)
        zero = np.full_like(scale, 2 ** (bits - 1))
    else:
        lo = np.minimum(np.nanmin(wp, axis=2), 0)
        hi = np.maximum(np.nanmax(wp, axis=2), 0)
        scale = np.where(hi == lo, 1.0, (hi - lo) / maxq)
        scale = np.maximum(scale, 2.0 ** -14).astype(np.float16).astype(np.float64)
        zero = np.where(hi == lo, 0, np.clip(np.round(-lo / scale), 0, maxq))
    q = np.clip(np.round(wp / scale[..., None]) + zero[..., None], 0, maxq)
    deq = scale[..., None] * (q - zero[..., None])
    return (q.reshape(out_f, -1)[:, :in_f].astype(np.uint8), scale, zero,
            deq.reshape(out_f, -1)[:, :in_f])


CASES = [(8, -1, True), (8, -1, False), (4, 128, True), (4, 128, False), (4, 32, True), (4, 48, False)]


@pytest.mark.parametrize("bits,group,sym", CASES)
def test_rtn_matches_reference_bit_for_bit(bits, group, sym):
    rng = np.random.default_rng(bits * 1000 + abs(group))
    w = rng.normal(0, 0.02, size=(24, 256)) + rng.normal(0, 0.01, size=(24, 1))  # rows with offsets (asym)
    w[3, :] = 0.0  # an all-zero row
    w = w.astype(np.float32)
    qw = quantize_rtn(w, QuantConfig(bits=bits, group_size=group, sym=sym))
    codes, scale, zero, deq = reference_rtn(w.astype(np.float64), bits, group, sym)
    np.testing.assert_array_equal(qw.codes, codes)
    np.testing.assert_array_equal(qw.scales.astype(np.float64), scale)
    np.testing.assert_array_equal(qw.zeros.astype(np.float64), zero)
    np.testing.assert_array_equal(dequantize(qw), deq.astype(np.float32))
    # error bound: inside the grid range rounding error is at most half a step
    g = np.arange(256) // (256 if group == -1 else group)
    assert np.all(np.abs(w - dequantize(qw)) <= qw.scales.astype(np.float64)[:, g] / 2 * (1 + 1e-6) + 1e-12)


def test_int8_per_channel_relative_error_small():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, size=(64, 512)).astype(np.float32)
    err = np.abs(dequantize(quantize_rtn(w, QuantConfig(bits=8, group_size=-1))) - w)
    assert err.max() <= np.abs(w).max(axis=1, keepdims=True).max() / 127 / 2 * 1.001


def test_int4_storage_ratio_g128():
    w = np.random.default_rng(2).normal(size=(256, 256)).astype(np.float32)
    qw = quantize_rtn(w, QuantConfig(bits=4, group_size=128, sym=True))
    # codes 0.5 byte each + one float16 scale per 128 weights; zeros implied when symmetric
    assert qw.stored_bytes() == 256 * 128 + 256 * 2 * 2
    assert w.nbytes / qw.stored_bytes() >= 7.5


@pytest.mark.parametrize("field,value", [("bits", 3), ("group_size", 0), ("method", "awq"), ("damp_percent", 2.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"quant.{field}="):
        QuantConfig(**{field: value}).validate()
