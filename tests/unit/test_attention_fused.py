"""The Ascend fused backend's argument construction (pure functions, testable on CPU) and its CPU refusal."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.attention import attention
from ascend_llm.attention.fused import (
    FusedAttentionUnavailable,
    compressed_causal_mask,
    discard_mask,
    from_layout,
    fused_args,
    to_layout,
)
from ascend_llm.attention.masks import segment_codes


def test_causal_uses_sparse_mode_2_when_square_and_3_bottom_right_otherwise():
    square = fused_args((1, 8, 4096, 128), (1, 8, 4096, 128), causal=True)
    assert (square.sparse_mode, square.mask, square.head_num) == (2, "compressed", 8)
    assert square.scale_value == pytest.approx(128 ** -0.5)
    rect = fused_args((1, 8, 128, 64), (1, 2, 4096, 64), causal=True, scale=0.3)
    assert (rect.sparse_mode, rect.mask, rect.scale_value) == (3, "compressed", 0.3)
    plain = fused_args((1, 8, 128, 64), (1, 8, 128, 64), causal=False)
    assert (plain.sparse_mode, plain.mask) == (0, "none")
    masked = fused_args((1, 8, 128, 64), (1, 8, 128, 64), causal=True, has_mask=True, layout="BSH")
    assert (masked.sparse_mode, masked.mask, masked.input_layout) == (0, "full", "BSH")


@pytest.mark.parametrize("q_shape, kv_shape, layout, match", [
    ((1, 8, 16, 40), (1, 8, 16, 40), "BNSD", "multiple of 16"),
    ((1, 6, 16, 64), (1, 4, 16, 64), "BNSD", "multiple of num_kv_heads"),
    ((1, 8, 16, 64), (1, 8, 16, 64), "SBH", "layout"),
])
def test_shapes_the_kernel_rejects_are_refused(q_shape, kv_shape, layout, match):
    with pytest.raises(ValueError, match=match):
        fused_args(q_shape, kv_shape, causal=True, layout=layout)


def test_compressed_mask_discards_strictly_above_the_diagonal():
    mask = compressed_causal_mask()
    assert mask.shape == (2048, 2048) and mask.dtype == bool
    np.testing.assert_array_equal(mask, np.arange(2048)[None, :] > np.arange(2048)[:, None])


def test_full_discard_mask_marks_positions_to_drop():
    seg = np.array([[0, 0, 1, 1, 1]], np.int32)
    keep_key = np.array([[True, True, True, True, False]])
    codes = segment_codes(1, 5, 5, Tensor(seg), None, None, Tensor(keep_key))
    hidden = discard_mask(5, 5, True, codes).asnumpy().reshape(5, 5)
    causal = np.arange(5)[None, :] <= np.arange(5)[:, None]
    same_doc = seg[0][:, None] == seg[0][None, :]
    np.testing.assert_array_equal(hidden, ~(causal & same_doc & keep_key[0][None, :]))


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_layouts_round_trip(layout):
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 8)).astype(np.float32)
    there = to_layout(Tensor(x), layout)
    expected = {"BSH": (2, 6, 32), "BSND": (2, 6, 4, 8), "BNSD": (2, 4, 6, 8)}[layout]
    assert tuple(there.shape) == expected
    np.testing.assert_array_equal(from_layout(there, layout, 4).asnumpy(), x)


def test_fused_backend_raises_a_clear_error_on_cpu():
    x = Tensor(np.zeros((1, 2, 4, 16), np.float32))
    with pytest.raises(FusedAttentionUnavailable, match="attention=segmented"):
        attention(x, x, x, causal=True, backend="fused")
