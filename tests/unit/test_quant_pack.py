"""Bit packing: round trips, and the bit positions checked against hand-written words."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.quant.pack import pack_int4, pack_int32, unpack_int4, unpack_int32


def test_int4_round_trip_and_nibble_order():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(5, 34)).astype(np.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 17) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed), codes)
    # byte j = code[2j] + 16 * code[2j+1]
    np.testing.assert_array_equal(packed.astype(np.int64), codes[:, 0::2] + 16 * codes[:, 1::2].astype(np.int64))
    assert pack_int4(np.array([[3, 12]]))[0, 0] == 0xC3


def test_int4_rejects_odd_and_out_of_range():
    with pytest.raises(ValueError, match="even"):
        pack_int4(np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(np.array([[16, 0]]))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_int32_round_trip(bits, axis):
    per = 32 // bits
    rng = np.random.default_rng(bits)
    shape = (2 * per, 3) if axis == 0 else (3, 2 * per)
    codes = rng.integers(0, 2 ** bits, size=shape).astype(np.uint8)
    words = pack_int32(codes, bits, axis)
    assert words.dtype == np.int32
    assert words.shape == ((2, 3) if axis == 0 else (3, 2))
    np.testing.assert_array_equal(unpack_int32(words, bits, axis), codes)


def test_int32_word_value_matches_gptq_bit_layout():
    # AutoGPTQ: word |= code[j] << (bits * j), j = 0..7 along the packed axis
    codes = np.arange(8, dtype=np.uint8).reshape(8, 1)
    expected = sum(int(c) << (4 * j) for j, c in enumerate(codes[:, 0]))
    assert int(pack_int32(codes, 4, 0).view(np.uint32)[0, 0]) == expected == 0x76543210
    top = np.full((8, 1), 15, np.uint8)
    assert int(pack_int32(top, 4, 0)[0, 0]) == -1  # all bits set: int32 view of 0xFFFFFFFF
