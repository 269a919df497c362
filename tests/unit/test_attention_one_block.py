"""Segmented attention's one-block path (attention/one_block.py): bit for bit the loop path on the same cell, and
exact against the float64 NumPy reference of test_attention_segmented (plus the log-sum-exp's gradient)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from ascend_llm.attention import attention
from ascend_llm.attention.masks import segment_codes
from ascend_llm.attention.segmented import SegmentedAttention
from tests.unit.test_attention_segmented import assert_close, data, reference

CASES = {  # name: (causal, seq_q, seq_k, heads, kv_heads, packed documents + padded keys)
    "causal gqa": (True, 37, 37, 4, 2, False),
    "bottom-right sq < sk": (True, 13, 29, 6, 2, False),
    "not causal": (False, 20, 31, 2, 2, False),
    "documents, padding, empty rows": (True, 29, 29, 4, 2, True),
}


def inputs(case: str, seed: int = 11):
    causal, seq_q, seq_k, heads, kv_heads, packed = CASES[case]
    q, k, v, d_out = data(heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_k=seq_k, seed=seed)
    lse_weight = np.random.default_rng(seed + 1).standard_normal(q.shape[:3])
    options, codes = {}, (None, None)
    if packed:  # row 1's second document has every key padded: its queries see nothing
        seg = np.array([[0] * 10 + [1] * 12 + [2] * 7, [5] * 20 + [6] * 9], np.int32)
        key_mask = np.ones((2, seq_k), bool)
        key_mask[1, 20:] = False
        options = {"segment_ids": Tensor(seg), "key_mask": Tensor(key_mask)}
        codes = (seg, np.where(key_mask, seg, -1))
    return causal, q, k, v, d_out, lse_weight, options, codes


def cell_run(cell, q, k, v, d_out, lse_weight, q_codes, k_codes):
    """out, lse and the gradients of sum(out * d_out) + sum(lse * lse_weight) (lse of rows that see no key taken
    as 0) through `cell` in one graph."""
    d, w, u = q.shape[-1], Tensor(d_out.astype(np.float32)), Tensor(lse_weight.astype(np.float32))

    def loss(q_, k_, v_):
        packed = cell(q_, k_, v_, q_codes, k_codes)
        out, lse = packed[..., :d], packed[..., d]
        finite = ops.where(ops.isinf(lse), 0.0, lse)
        return (out * w).sum() + (finite * u).sum(), out, lse

    (_, out, lse), grads = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True))(
        Tensor(q), Tensor(k), Tensor(v))
    return [x.asnumpy() for x in (out, lse, *grads)]


@pytest.mark.parametrize("case", list(CASES))
def test_one_block_path_equals_the_loop_path_bit_for_bit(case):
    causal, q, k, v, d_out, lse_weight, options, _ = inputs(case)
    codes = segment_codes(q.shape[0], q.shape[2], k.shape[2], options.get("segment_ids"), None, None,
                          options.get("key_mask"))
    placeholder = Tensor(np.zeros((1,), np.int32))
    q_codes, k_codes = codes if codes is not None else (placeholder, placeholder)
    results = []
    for one_block in (True, False):
        cell = SegmentedAttention(q.shape, k.shape, causal, q.shape[-1] ** -0.5, None, None, codes is not None)
        assert cell.one_block  # whole sequences are one block (auto block sizes, at most 512 tokens)
        cell.one_block = one_block  # False: the loops, one iteration each
        results.append(cell_run(cell, q, k, v, d_out, lse_weight, q_codes, k_codes))
    for name, fast, loops in zip(("out", "lse", "dq", "dk", "dv"), *results):
        np.testing.assert_array_equal(fast, loops, err_msg=f"{case}: {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_one_block_path_matches_float64_with_the_lse_gradient(case):
    causal, q, k, v, d_out, lse_weight, options, (q_codes, k_codes) = inputs(case, seed=21)
    w, u = Tensor(d_out.astype(np.float32)), Tensor(lse_weight.astype(np.float32))

    def loss(q_, k_, v_):
        out, lse = attention(q_, k_, v_, causal=causal, backend="segmented", return_lse=True, **options)
        return (out * w).sum() + (ops.where(ops.isinf(lse), 0.0, lse) * u).sum(), out, lse

    (_, out, lse), grads = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True))(
        Tensor(q), Tensor(k), Tensor(v))
    got = [x.asnumpy() for x in (out, lse, *grads)]
    want = reference(q, k, v, causal=causal, q_codes=q_codes, k_codes=k_codes, d_out=d_out, lse_weight=lse_weight)
    np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(want[1]))
    for g, ref, tol, name in zip(got, want, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4), ("out", "lse", "dq", "dk", "dv")):
        finite = np.isfinite(ref)
        assert_close(np.where(finite, g, 0.0), np.where(finite, ref, 0.0), tol, f"{case}: {name}")


def test_one_block_fp16_and_bf16_return_the_input_dtype_and_stay_close():
    q, k, v, _ = data(seed=31, dtype=np.float16)
    ref = reference(q, k, v, causal=True)[0]
    out = attention(Tensor(q), Tensor(k), Tensor(v), causal=True, backend="segmented")
    assert out.dtype == ms.float16
    assert_close(out.asnumpy(), ref, 2e-3, "fp16")
    bf16 = attention(Tensor(q).astype(ms.bfloat16), Tensor(k).astype(ms.bfloat16), Tensor(v).astype(ms.bfloat16),
                     causal=True, backend="segmented")
    assert bf16.dtype == ms.bfloat16
    assert_close(bf16.astype(ms.float32).asnumpy(), ref, 2e-2, "bf16")
