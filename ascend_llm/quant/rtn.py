"""Weight quantization grid and round-to-nearest (RTN) for (out, in) Dense weights.

Codes are unsigned integers q in [0, 2**bits - 1]; each (output row, input group) has a float16 scale s and an
integer zero point z, and the weight is recovered as w ~ s * (q - z) (the GPTQ/AutoGPTQ convention, which is
also Ascend's WeightQuantBatchMatmul `(weight + offset) * scale` with offset = -z on signed codes q - 2**(b-1)).

Grid (per group, computed in float64, scale then rounded to float16 and codes computed with that stored scale):
  symmetric:  z = 2**(b-1), s = max|w| / (2**(b-1) - 1)       (codes 1 .. 2**b - 1 used; no clipping)
  asymmetric: lo = min(w, 0), hi = max(w, 0), s = (hi - lo) / (2**b - 1), z = round(-lo / s)
  q = clip(round_half_even(w / s) + z, 0, 2**b - 1)
An all-zero group gets s = 1. Scales below float16's smallest normal (2**-14) are raised to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ascend_llm.config.quant import QuantConfig
from ascend_llm.quant.pack import pack_int4

FP16_MIN_NORMAL = 2.0 ** -14


@dataclass
class QuantizedWeight:
    """A quantized (out, in) weight.

    codes (out, in) uint8 in [0, 2**bits-1]; scales (out, G) float16; zeros (out, G) uint8;
    g_idx (in,) int32 group of each input column, or None for the contiguous layout col // group_size.
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    group_size: int
    sym: bool
    g_idx: Optional[np.ndarray] = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def group_of_column(self) -> np.ndarray:
        """(in,) int32 group index of every input column."""
        if self.g_idx is not None:
            return self.g_idx
        return group_index(self.codes.shape[1], self.group_size)

    def stored_bytes(self) -> int:
        """Bytes this weight occupies when stored: codes (int4 packed two per byte), scales, zeros unless
        symmetric (then implied), g_idx only when it is not the contiguous layout."""
        code_bytes = self.codes.size // 2 if self.bits == 4 else self.codes.size
        total = code_bytes + self.scales.nbytes + (0 if self.sym else self.zeros.nbytes)
        return total + (self.g_idx.nbytes if self.g_idx is not None else 0)

    def packed_codes(self) -> np.ndarray:
        """(out, in // 2) uint8 for int4, (out, in) uint8 for int8."""
        return pack_int4(self.codes) if self.bits == 4 else self.codes


def effective_group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else group_size


def group_index(in_features: int, group_size: int) -> np.ndarray:
    """(in,) int32: column // group_size (group_size -1 -> all zeros)."""
    return (np.arange(in_features) // effective_group_size(group_size, in_features)).astype(np.int32)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // effective_group_size(group_size, in_features))


def grid_params(w: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each row of w (rows, n) -> (scale (rows,) float16, zero (rows,) uint8)."""
    w = np.asarray(w, np.float64)
    maxq = 2 ** bits - 1
    if sym:
        amax = np.abs(w).max(axis=1)
        scale = np.where(amax > 0, amax / (2 ** (bits - 1) - 1), 1.0)
        zero = np.full(w.shape[0], 2 ** (bits - 1), np.float64)
    else:
        lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        empty = hi == lo
        scale = np.where(empty, 1.0, (hi - lo) / maxq)
        zero = None
    scale16 = np.maximum(scale, FP16_MIN_NORMAL).astype(np.float16)
    if zero is None:
        zero = np.clip(np.round(-lo / scale16.astype(np.float64)), 0, maxq)
        zero = np.where(empty, 0.0, zero)
    return scale16, zero.astype(np.uint8)


def quantize_columns(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes of w (rows, n) on a given grid (scale, zero broadcastable to w) -> uint8."""
    q = np.round(np.asarray(w, np.float64) / np.asarray(scale, np.float64)) + np.asarray(zero, np.float64)
    return np.clip(q, 0, 2 ** bits - 1).astype(np.uint8)


def quantize_rtn(weight: np.ndarray, cfg: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest quantization of a Dense weight (out, in), grouped along the input axis."""
    w = np.asarray(weight, np.float64)
    out_f, in_f = w.shape
    size = effective_group_size(cfg.group_size, in_f)
    groups = num_groups(in_f, cfg.group_size)
    codes = np.empty((out_f, in_f), np.uint8)
    scales = np.empty((out_f, groups), np.float16)
    zeros = np.empty((out_f, groups), np.uint8)
    for g in range(groups):
        cols = slice(g * size, min((g + 1) * size, in_f))
        scales[:, g], zeros[:, g] = grid_params(w[:, cols], cfg.bits, cfg.sym)
        codes[:, cols] = quantize_columns(w[:, cols], scales[:, g:g + 1], zeros[:, g:g + 1], cfg.bits)
    return QuantizedWeight(codes, scales, zeros, cfg.bits, cfg.group_size, cfg.sym)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """(out, in) float32 = scale * (code - zero), evaluated in float32 (exact: |code - zero| < 2**8 and the
    float16 scale has an 11-bit significand, so the product fits float32's 24 bits)."""
    g = qw.group_of_column()
    scale = qw.scales.astype(np.float32)[:, g]
    return scale * (qw.codes.astype(np.float32) - qw.zeros.astype(np.float32)[:, g])
