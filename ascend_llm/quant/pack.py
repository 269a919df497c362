"""Bit packing of integer codes: int4 two per byte (ours) and the int32 layouts of Hugging Face GPTQ checkpoints.

Ours: `pack_int4` puts code 2j in the low nibble and code 2j+1 in the high nibble of byte j along the last axis.
GPTQ (AutoGPTQ/optimum `qweight`, `qzeros`): 32 // bits codes per int32, code j of a word at bits
[bits*j, bits*(j+1)); `qweight` packs along the input (row) axis of the (in, out) weight, `qzeros` along the
output (column) axis of the (groups, out) zero points.
"""

from __future__ import annotations

import numpy as np


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """codes (..., n) integers in [0, 15], n even -> (..., n // 2) uint8. ValueError on odd n or out-of-range."""
    codes = np.asarray(codes)
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """(..., m) uint8 -> (..., 2m) uint8 codes in [0, 15]; inverse of `pack_int4`."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"GPTQ int32 packing supports 2, 4 or 8 bits, got {bits}")
    return 32 // bits


def pack_int32(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """2-D unsigned codes -> int32 words holding 32 // bits codes along `axis` (0: rows, 1: columns)."""
    per = _per_word(bits)
    c = np.asarray(codes, dtype=np.uint32)
    if axis == 1:
        return pack_int32(c.T, bits, 0).T.copy()
    if c.shape[0] % per:
        raise ValueError(f"GPTQ packing needs a multiple of {per} along axis {axis}, got {c.shape}")
    c = c.reshape(c.shape[0] // per, per, c.shape[1])
    words = np.zeros((c.shape[0], c.shape[2]), np.uint32)
    for j in range(per):
        words |= c[:, j, :] << np.uint32(bits * j)
    return words.view(np.int32)


def unpack_int32(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Inverse of `pack_int32`: int32 words -> uint8 codes (2-D)."""
    per = _per_word(bits)
    w = np.ascontiguousarray(words).view(np.uint32)
    if axis == 1:
        return unpack_int32(w.T.copy().view(np.int32), bits, 0).T.copy()
    mask = np.uint32((1 << bits) - 1)
    parts = [(w >> np.uint32(bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=1).reshape(w.shape[0] * per, w.shape[1]).astype(np.uint8)
