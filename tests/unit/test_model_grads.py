"""Gradients of the hand-written backward passes (RMSNorm, RoPE) against float64 NumPy finite differences."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.models.llama import RMSNorm, apply_rope, rope_tables


def rms_norm_np(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_np(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def numeric_grad(f, x, h=1e-6):
    """d sum(f(x) * c) / dx by central differences in float64 (c is folded into f)."""
    grad = np.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + h
        up = f(x)
        flat[i] = keep - h
        down = f(x)
        flat[i] = keep
        out[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("jit", [True, False])
def test_rmsnorm_backward_matches_finite_differences(jit):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8)) * 2.0
    w = rng.normal(size=8)
    c = rng.normal(size=(2, 3, 8))
    eps = 1e-5
    norm = RMSNorm(8, eps)
    norm.weight.set_data(Tensor(w.astype(np.float32)))

    def loss(xt):
        return (norm(xt) * Tensor(c.astype(np.float32))).sum()

    grad_fn = ms.value_and_grad(loss, 0, norm.trainable_params())
    if jit:
        grad_fn = ms.jit(grad_fn)
    value, (dx, (dw,)) = grad_fn(Tensor(x.astype(np.float32)))
    assert abs(float(value.asnumpy()) - (rms_norm_np(x, w, eps) * c).sum()) < 1e-4
    ref_dx = numeric_grad(lambda v: (rms_norm_np(v, w, eps) * c).sum(), x.copy())
    ref_dw = numeric_grad(lambda v: (rms_norm_np(x, v, eps) * c).sum(), w.copy())
    np.testing.assert_allclose(dx.asnumpy(), ref_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw.asnumpy(), ref_dw, rtol=1e-4, atol=1e-5)


def test_rmsnorm_keeps_half_input_dtype():
    x = Tensor(np.random.default_rng(1).normal(size=(2, 4)).astype(np.float16))
    norm = RMSNorm(4)
    out = norm(x)
    assert out.dtype == ms.float16

    def loss(t):
        return norm(t).astype(ms.float32).sum()

    dx = ms.grad(loss, 0)(x)
    assert dx.dtype == ms.float16


@pytest.mark.parametrize("jit", [True, False])
def test_rope_backward_matches_finite_differences(jit):
    rng = np.random.default_rng(2)
    cos, sin = rope_tables(8, 16, 10000.0)
    cos, sin = cos[:5].astype(np.float64), sin[:5].astype(np.float64)
    x = rng.normal(size=(1, 2, 5, 8))
    c = rng.normal(size=x.shape)

    def loss(xt):
        return (apply_rope(xt, Tensor(cos.astype(np.float32)), Tensor(sin.astype(np.float32)))
                * Tensor(c.astype(np.float32))).sum()

    grad_fn = ms.value_and_grad(loss, 0)
    if jit:
        grad_fn = ms.jit(grad_fn)
    value, dx = grad_fn(Tensor(x.astype(np.float32)))
    assert abs(float(value.asnumpy()) - (rope_np(x, cos, sin) * c).sum()) < 1e-4
    ref = numeric_grad(lambda v: (rope_np(v, cos, sin) * c).sum(), x.copy())
    np.testing.assert_allclose(dx.asnumpy(), ref, rtol=1e-4, atol=1e-5)
