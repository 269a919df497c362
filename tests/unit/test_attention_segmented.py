"""Segmented attention against an independent float64 NumPy reference: forward, log-sum-exp, gradients, masks,
GQA, block-size invariance, fp16, extreme logits, merging partial results."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.attention import attention, empty_partial, merge_attention


def reference(q, k, v, causal=False, scale=None, q_codes=None, k_codes=None, d_out=None, lse_weight=None):
    """float64 attention with GQA by repeating heads; returns out, lse and (given d_out) dq, dk, dv: the gradients of
    sum(out * d_out), plus sum(lse * lse_weight) over the rows that see a key when lse_weight (B, H, Sq) is given
    (d lse_i / d s_ij = p_ij, so dS = P * (dP - rowsum(dO * O) + dLSE), the softmax chain rule)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = dim ** -0.5 if scale is None else scale
    s = q @ kr.transpose(0, 1, 3, 2) * scale
    keep = np.ones((batch, 1, seq_q, seq_k), bool)
    if causal:
        keep &= np.arange(seq_k)[None, :] <= np.arange(seq_q)[:, None] + (seq_k - seq_q)
    if q_codes is not None:
        keep &= (q_codes[:, None, :, None] == k_codes[:, None, None, :])
    s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    seen = np.isfinite(m)
    m = np.where(seen, m, 0.0)
    p = np.exp(s - m)
    total = p.sum(-1, keepdims=True)
    p = np.where(seen, p / np.where(seen, total, 1.0), 0.0)
    out = p @ vr
    lse = np.where(seen, m + np.log(np.where(seen, total, 1.0)), -np.inf)[..., 0]
    if d_out is None:
        return out, lse
    dv = (p.transpose(0, 1, 3, 2) @ d_out).reshape(batch, kv_heads, group, seq_k, dim).sum(2)
    dp = d_out @ vr.transpose(0, 1, 3, 2)
    d_lse = 0.0 if lse_weight is None else lse_weight[..., None]  # p is 0 on rows that see no key
    ds = p * (dp - (d_out * out).sum(-1, keepdims=True) + d_lse)
    dq = ds @ kr * scale
    dk = (ds.transpose(0, 1, 3, 2) @ q * scale).reshape(batch, kv_heads, group, seq_k, dim).sum(2)
    return out, lse, dq, dk, dv


def data(batch=2, heads=4, kv_heads=2, seq_q=37, seq_k=37, dim=16, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, seq_q, dim)).astype(dtype)
    k = rng.standard_normal((batch, kv_heads, seq_k, dim)).astype(dtype)
    v = rng.standard_normal((batch, kv_heads, seq_k, dim)).astype(dtype)
    d_out = rng.standard_normal((batch, heads, seq_q, dim)).astype(np.float64)
    return q, k, v, d_out


def run(q, k, v, d_out=None, backend="segmented", **options):
    """Forward (out, lse) and, given d_out, gradients of sum(out * d_out) — all through ms.jit. With d_out one
    graph returns all five: the attention call's (out, lse) as value_and_grad's aux outputs (no gradient flows
    into them), so the forward that is checked is the one the gradients come from (one compile, not two)."""
    if d_out is None:
        def fwd(q_, k_, v_):
            return attention(q_, k_, v_, backend=backend, return_lse=True, **options)

        out, lse = ms.jit(fwd)(Tensor(q), Tensor(k), Tensor(v))
        return out.asnumpy(), lse.asnumpy()
    weight = Tensor(d_out.astype(np.float32))

    def loss(q_, k_, v_):
        out, lse = attention(q_, k_, v_, backend=backend, return_lse=True, **options)
        return (out.astype(ms.float32) * weight).sum(), out, lse

    step = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True))
    (_, out, lse), grads = step(Tensor(q), Tensor(k), Tensor(v))
    return (out.asnumpy(), lse.asnumpy(), *(g.asnumpy() for g in grads))


def assert_close(got, ref, atol, what):
    err = np.abs(np.asarray(got, np.float64) - ref).max()
    assert err <= atol, f"{what}: max abs error {err:.2e} > {atol:.0e}"


@pytest.mark.parametrize("causal, block", [(False, 7), (True, 1), (True, 7), (True, 64), (True, 37)])
def test_forward_lse_and_gradients_match_float64(causal, block):
    """Block sizes 1, 7 (37 is not a multiple), 64 (> N) and N give the same exact result."""
    q, k, v, d_out = data()
    out, lse, dq, dk, dv = run(q, k, v, d_out, causal=causal, block_q=block, block_k=block)
    ref = reference(q, k, v, causal=causal, d_out=d_out)
    for got, want, tol, name in zip((out, lse, dq, dk, dv), ref, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4),
                                    ("out", "lse", "dq", "dk", "dv")):
        assert_close(got, want, tol, name)


def test_unequal_block_sizes_and_query_shorter_than_keys_bottom_right_causal():
    q, k, v, d_out = data(seq_q=13, seq_k=37, seed=1)
    out, lse, dq, dk, dv = run(q, k, v, d_out, causal=True, block_q=5, block_k=8)
    ref = reference(q, k, v, causal=True, d_out=d_out)
    for got, want, tol in zip((out, lse, dq, dk, dv), ref, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4)):
        assert_close(got, want, tol, "sq != sk")


def test_packed_documents_and_padding_no_leakage_and_empty_rows_are_zero():
    q, k, v, d_out = data(seq_q=29, seq_k=29, seed=2)
    seg = np.array([[0] * 10 + [1] * 12 + [2] * 7, [5] * 20 + [6] * 9], np.int32)
    key_mask = np.ones((2, 29), bool)
    key_mask[1, 20:] = False  # document 6 of row 1 has all keys padded: its queries see nothing
    q_codes = seg.copy()
    k_codes = np.where(key_mask, seg, -1)
    out, lse, dq, dk, dv = run(q, k, v, d_out, causal=True, block_q=8, block_k=8,
                               segment_ids=Tensor(seg), key_mask=Tensor(key_mask))
    ref = reference(q, k, v, causal=True, q_codes=q_codes, k_codes=k_codes, d_out=d_out)
    for got, want, tol in zip((out, dq, dk, dv), (ref[0], *ref[2:]), (1e-5, 1e-4, 1e-4, 1e-4)):
        assert np.isfinite(got).all()
        assert_close(got, want, tol, "packed")
    assert (out[1, :, 20:] == 0).all() and (dq[1, :, 20:] == 0).all() and np.isneginf(lse[1, :, 20:]).all()
    assert (dk[1, :, 20:] == 0).all() and (dv[1, :, 20:] == 0).all()
    # no leakage: document 1 alone gives the same output as inside the packed row
    alone = reference(q[:1, :, 10:22], k[:1, :, 10:22], v[:1, :, 10:22], causal=True)[0]
    assert_close(out[:1, :, 10:22], alone, 1e-5, "document 1 alone")


def test_extreme_logits_stay_finite_and_exact():
    q, k, v, _ = data(seed=3)
    q = q * 100.0
    out, lse = run(q, k, v, causal=True, block_q=8, block_k=8)
    ref_out, ref_lse = reference(q, k, v, causal=True)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert_close(out, ref_out, 1e-4, "x100 logits")
    assert np.abs(lse - ref_lse).max() / np.abs(ref_lse).max() < 1e-6


def test_fp16_error_at_most_twice_naive_fp16():
    q, k, v, _ = data(seed=4, dtype=np.float16)
    ref = reference(q, k, v, causal=True)[0]
    seg = run(q, k, v, causal=True, block_q=8, block_k=8)[0]
    naive = run(q, k, v, backend="naive", causal=True)[0]
    assert seg.dtype == np.float16
    seg_err, naive_err = np.abs(seg - ref).max(), np.abs(naive - ref).max()
    assert seg_err <= 2 * naive_err, f"segmented fp16 error {seg_err:.2e} vs naive fp16 {naive_err:.2e}"


def test_merging_partials_over_split_keys_equals_attention_over_the_union():
    q, k, v, _ = data(seq_q=11, seq_k=30, seed=5)
    out_a, lse_a = run(q, k[:, :, :17], v[:, :, :17], block_q=4, block_k=4)
    out_b, lse_b = run(q, k[:, :, 17:], v[:, :, 17:], block_q=4, block_k=4)
    merged, lse = merge_attention(Tensor(out_a), Tensor(lse_a), Tensor(out_b), Tensor(lse_b))
    ref_out, ref_lse = reference(q, k, v)
    assert_close(merged.asnumpy(), ref_out, 1e-5, "merged out")
    assert_close(lse.asnumpy(), ref_lse, 1e-5, "merged lse")
    empty_out, empty_lse = empty_partial(Tensor(out_a))
    same, same_lse = merge_attention(Tensor(out_a), Tensor(lse_a), empty_out, empty_lse)
    np.testing.assert_array_equal(same.asnumpy(), out_a)
    np.testing.assert_array_equal(same_lse.asnumpy(), lse_a)


def test_naive_backend_agrees_with_the_reference_on_masks():
    q, k, v, _ = data(seq_q=9, seq_k=9, seed=6)
    seg = np.array([[0] * 4 + [1] * 5, [3] * 9], np.int32)
    out, lse = run(q, k, v, backend="naive", causal=True, segment_ids=Tensor(seg))
    ref_out, ref_lse = reference(q, k, v, causal=True, q_codes=seg, k_codes=seg)
    assert_close(out, ref_out, 1e-5, "naive out")
    assert_close(lse, ref_lse, 1e-5, "naive lse")


def mask_path(q_shape, kv_shape, causal, block_q, block_k, has_segments=False):
    """'constant' when every masked block pair shares one precomputed mask, else 'per-pair'."""
    from ascend_llm.attention.segmented import SegmentedAttention

    cell = SegmentedAttention(q_shape, kv_shape, causal, 1.0, block_q, block_k, has_segments)
    return "per-pair" if cell.pair_bias is None else "constant"


@pytest.mark.parametrize("causal, seq_q, seq_k, block, gqa", [(True, 37, 37, 8, True), (True, 32, 32, 8, False),
                                                               (False, 20, 37, 8, True), (True, 11, 27, 8, True)])
def test_shared_constant_mask_path_is_taken_and_exact(causal, seq_q, seq_k, block, gqa):
    """Causal diagonal blocks with block_q == block_k (odd length: the last block is padded; Sq < Sk with a
    shift that is a multiple of the block) and a padded last key block without causal share one mask."""
    heads, kv_heads = (4, 2) if gqa else (2, 2)
    q, k, v, d_out = data(heads=heads, kv_heads=kv_heads, seq_q=seq_q, seq_k=seq_k, seed=7)
    assert mask_path(q.shape, k.shape, causal, block, block) == "constant"
    got = run(q, k, v, d_out, causal=causal, block_q=block, block_k=block)
    ref = reference(q, k, v, causal=causal, d_out=d_out)
    for g, want, tol, name in zip(got, ref, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4), ("out", "lse", "dq", "dk", "dv")):
        assert_close(g, want, tol, name)


def test_pairs_with_different_masks_and_segments_build_masks_per_pair():
    assert mask_path((1, 2, 13, 8), (1, 2, 37, 8), True, 5, 8) == "per-pair"  # shifts differ from pair to pair
    assert mask_path((1, 2, 32, 8), (1, 2, 32, 8), True, 8, 8, has_segments=True) == "per-pair"


def test_segment_ids_with_gqa_and_odd_length_exact():
    q, k, v, d_out = data(heads=6, kv_heads=2, seq_q=45, seq_k=45, seed=8)
    seg = np.array([[0] * 9 + [1] * 30 + [2] * 6, [4] * 45], np.int32)
    got = run(q, k, v, d_out, causal=True, block_q=16, block_k=16, segment_ids=Tensor(seg))
    ref = reference(q, k, v, causal=True, q_codes=seg, k_codes=seg, d_out=d_out)
    for g, want, tol, name in zip(got, ref, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4), ("out", "lse", "dq", "dk", "dv")):
        assert_close(g, want, tol, name)


def test_auto_block_sizes_per_length_and_exact_beyond_one_block():
    """No block sizes given: one block up to 512 tokens, 512-token blocks beyond (N = 600: a full block and a
    padded one), still exact."""
    from ascend_llm.attention.segmented import AUTO_BLOCK, auto_block_size

    assert [auto_block_size(n) for n in (1, 256, 512, 600, 8192)] == [1, 256, 512, 512, 512] and AUTO_BLOCK == 512
    q, k, v, d_out = data(batch=1, heads=2, kv_heads=1, seq_q=600, seq_k=600, dim=8, seed=9)
    got = run(q, k, v, d_out, causal=True)
    ref = reference(q, k, v, causal=True, d_out=d_out)
    for g, want, tol, name in zip(got, ref, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4), ("out", "lse", "dq", "dk", "dv")):
        assert_close(g, want, tol, name)


def test_attention_config_defaults_to_auto_with_per_length_blocks_and_rejects_bad_blocks():
    from ascend_llm.config.attention import AttentionConfig
    from ascend_llm.errors import ConfigError

    cfg = AttentionConfig()
    assert (cfg.backend, cfg.block_q, cfg.block_k) == ("auto", None, None)
    cfg.validate()
    AttentionConfig(block_q=64, block_k=128).validate()
    with pytest.raises(ConfigError, match=r"attention.block_k=0: must be > 0"):
        AttentionConfig(block_k=0).validate()
