"""What the layer keeps for its backward (issue 23): PrecisionDense hands its GEMM's own dtype onward on Ascend,
naive attention recomputes its probabilities in the backward (gradients vs float64 NumPy), and the model's
(B, S, N, D) attention path (the fused kernel's, no transposes) gives the BNSD path's values and gradients."""

from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor  # noqa: E402

from ascend_llm.compose import compose_recipe  # noqa: E402


def test_native_gemm_output_is_handed_on_in_its_dtype():
    # fp16 MatMul runs natively on CPU, so the Ascend hand-off (native_output) is exercised here with fp16.
    from ascend_llm.precision.policy import PrecisionDense

    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 8)).astype(np.float32)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    ref = x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
    handed = PrecisionDense(Parameter(Tensor(w), name="w"), None, "float16", False, native_output=True)
    kept = PrecisionDense(Parameter(Tensor(w), name="v"), None, "float16", False)
    out, out32 = handed(Tensor(x)), kept(Tensor(x))
    assert out.dtype == ms.float16 and out32.dtype == ms.float32
    np.testing.assert_array_equal(out.asnumpy().astype(np.float32), out32.asnumpy())  # same values, half bytes
    np.testing.assert_allclose(out.asnumpy(), ref, rtol=2e-3, atol=2e-3)
    emulated = PrecisionDense(Parameter(Tensor(w), name="u"), None, "bfloat16", True, native_output=True)
    assert emulated(Tensor(x)).dtype == ms.float32  # the emulated bf16 GEMM keeps its fp32 accumulator


def reference_attention(q, k, v, seg):
    """float64 causal, document-masked GQA attention: (B, H, S, D) inputs, K/V heads repeated."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k.astype(np.float64), group, 1), np.repeat(v.astype(np.float64), group, 1)
    s = q.shape[2]
    scores = q.astype(np.float64) @ k.swapaxes(-1, -2) * q.shape[-1] ** -0.5
    keep = np.tril(np.ones((s, s), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
    scores = np.where(keep, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_naive_attention_backward_recomputes_and_matches_float64():
    from ascend_llm.attention.naive import naive_attention

    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((2, 4, 12, 8), (2, 2, 12, 8), (2, 2, 12, 8)))
    d_out = rng.normal(size=q.shape).astype(np.float32)
    seg = np.array([[0] * 5 + [1] * 7, [0] * 12], np.int32)

    def loss(q_, k_, v_, seg_):
        out = naive_attention(q_, k_, v_, causal=True, segment_ids=seg_, kv_segment_ids=seg_)
        return (out * Tensor(d_out)).sum()

    grads = ms.jit(ms.grad(loss, grad_position=(0, 1, 2)))(Tensor(q), Tensor(k), Tensor(v), Tensor(seg))
    eps = 1e-6
    for i, x in enumerate((q, k, v)):
        for idx in [tuple(rng.integers(0, n) for n in x.shape) for _ in range(12)]:
            args = [a.astype(np.float64) for a in (q, k, v)]
            args[i][idx] += eps
            plus = (reference_attention(*args, seg) * d_out).sum()
            args[i][idx] -= 2 * eps
            minus = (reference_attention(*args, seg) * d_out).sum()
            assert abs((plus - minus) / (2 * eps) - grads[i].asnumpy()[idx]) < 2e-5


def test_the_bsnd_attention_path_equals_the_bnsd_path():
    from ascend_llm.attention.core import CoreAttention
    from ascend_llm.train.build import build_training_model

    recipe = compose_recipe(["model=debug", "attention=naive", "model.qk_norm=true", "model.num_layers=1"])
    model = build_training_model(recipe)
    attention = model.layers[0].attention
    core = attention.core_attention
    assert isinstance(core, CoreAttention) and core.layout == "BNSD"  # only the fused kernel takes BSND
    x = Tensor(np.random.default_rng(2).normal(size=(2, 16, 64)).astype(np.float32))
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    params = attention.trainable_params()

    def run():  # a new function each time: a new compiled graph, built from the cells as they are now
        def step(inputs):
            def loss(h):
                return (attention(h, cos, sin) * attention(h, cos, sin)).mean()

            return ms.value_and_grad(loss, 0, params)(inputs)

        value, (dx, grads) = ms.jit(step)(x)
        return value.asnumpy(), [dx.asnumpy()] + [g.asnumpy() for g in grads]

    base = run()
    core.layout = "BSND"
    other = run()
    np.testing.assert_allclose(other[0], base[0], rtol=1e-6)
    for a, b in zip(other[1], base[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
