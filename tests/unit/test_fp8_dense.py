"""Fp8Dense against an independent FP8 reference built from ml_dtypes casts and float64 NumPy GEMMs, its
accuracy against float32, its statistics, and the apply_fp8 converter."""

from __future__ import annotations

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
from mindspore import Tensor, nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.config.precision import Fp8Config, PrecisionConfig
from ascend_llm.models.llama import build_model
from ascend_llm.precision import apply_fp8, apply_precision, describe_precision
from ascend_llm.precision.cpu_kernel import fused_available
from ascend_llm.precision.fp8_dense import Fp8Dense, build_fp8_recipe

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
F32 = np.float32


def cast(values: np.ndarray, dtype) -> np.ndarray:
    """TE's saturating cast: clip to +-max, then the ml_dtypes cast (round-to-nearest-even) and back."""
    top = float(ml_dtypes.finfo(dtype).max)
    return np.clip(values, -top, top).astype(dtype).astype(np.float32)


def te_scale(amax: float, fp8_max: float) -> np.float32:
    return F32(fp8_max) / F32(amax)


def make_layer(n_in: int, n_out: int, bias: bool, seed: int, kernels: str = "auto",
               **fp8) -> tuple[Fp8Dense, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(F32)
    b = rng.standard_normal(n_out).astype(F32) if bias else None
    dense = nn.Dense(n_in, n_out, has_bias=bias)
    dense.weight.set_data(Tensor(w))
    if bias:
        dense.bias.set_data(Tensor(b))
    cfg = PrecisionConfig(cpu_kernels=kernels, fp8=Fp8Config(enabled=True, **fp8))
    return Fp8Dense.from_dense(dense, build_fp8_recipe(cfg, device="CPU")), w, b


def grad_step(layer: Fp8Dense):
    def loss(x, r):
        return (layer(x) * r).sum()  # d loss / d y = r: the output gradient is known exactly

    return ms.jit(ms.value_and_grad(loss, 0, [layer.weight]))


def test_forward_and_backward_equal_the_fp8_reference_over_delayed_scaling_steps():
    rng = np.random.default_rng(0)
    layer, w, b = make_layer(48, 32, bias=True, seed=1, amax_history_len=4)
    x = rng.standard_normal((2, 40, 48)).astype(F32)
    r = (rng.standard_normal((2, 40, 32)) * 1e-3).astype(F32)
    step = grad_step(layer)
    x2, r2 = x.reshape(-1, 48), r.reshape(-1, 32)
    sx = sw = sg = F32(1.0)  # TE starts from scale 1; the first amax arrives after the first step
    for _ in range(3):
        loss, (dx, (dw,)) = step(Tensor(x), Tensor(r))
        qx, qw, qg = cast(x2 * sx, E4M3), cast(w * sw, E4M3), cast(r2 * sg, E5M2)
        y = qx.astype(np.float64) @ qw.T.astype(np.float64) / (np.float64(sx) * sw) + b
        dx_ref = qg.astype(np.float64) @ qw / (np.float64(sg) * sw)
        dw_ref = qg.T.astype(np.float64) @ qx / (np.float64(sg) * sx)
        np.testing.assert_allclose(float(loss.asnumpy()), (y * r2).sum(), rtol=1e-5)
        np.testing.assert_allclose(dx.asnumpy().reshape(-1, 48), dx_ref, rtol=1e-5, atol=1e-6 * abs(dx_ref).max())
        np.testing.assert_allclose(dw.asnumpy(), dw_ref, rtol=1e-5, atol=1e-6 * abs(dw_ref).max())
        sx, sw, sg = te_scale(abs(x).max(), 448), te_scale(abs(w).max(), 448), te_scale(abs(r).max(), 57344)
    assert layer.fp8_g_history.asnumpy()[-1] == F32(abs(r).max())  # the bprop recorded the gradient amax


def test_fused_cpu_kernel_and_mindspore_ops_paths_agree_bit_for_bit():
    if not fused_available("CPU"):
        pytest.skip("no C++ compiler: the fused CPU kernels are not built")
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((96, 32)) * 3).astype(F32)
    x[0, :3] = [0.0, 1e-12, -1e-12]
    r = (rng.standard_normal((96, 16)) * 1e-2).astype(F32)
    results = []
    for kernels in ("ops", "auto"):
        layer, _, _ = make_layer(32, 16, bias=False, seed=11, kernels=kernels, amax_history_len=3)
        assert layer.recipe.fused == (kernels == "auto")
        step = grad_step(layer)
        out = []
        for scale in (1.0, 40.0, 1.0):
            loss, (dx, (dw,)) = step(Tensor(x * F32(scale)), Tensor(r))
            out += [loss.asnumpy(), dx.asnumpy(), dw.asnumpy()]
        out += [p.asnumpy() for p in layer.get_parameters() if not p.requires_grad]
        results.append(out)
    for ops_value, fused_value in zip(*results):
        np.testing.assert_array_equal(ops_value, fused_value)


def test_current_scaling_uses_this_tensors_amax():
    rng = np.random.default_rng(4)
    layer, w, _ = make_layer(32, 16, bias=False, seed=5, recipe="current", format="e4m3")
    x = (rng.standard_normal((24, 32)) * 7).astype(F32)
    r = rng.standard_normal((24, 16)).astype(F32)
    _, (dx, (dw,)) = grad_step(layer)(Tensor(x), Tensor(r))
    sx, sw, sg = te_scale(abs(x).max(), 448), te_scale(abs(w).max(), 448), te_scale(abs(r).max(), 448)
    qx, qw, qg = cast(x * sx, E4M3), cast(w * sw, E4M3), cast(r * sg, E4M3)  # format=e4m3: gradients too
    dw_ref = qg.T.astype(np.float64) @ qx / (np.float64(sg) * sx)
    dx_ref = qg.astype(np.float64) @ qw / (np.float64(sg) * sw)
    np.testing.assert_allclose(dw.asnumpy(), dw_ref, rtol=1e-5, atol=1e-6 * abs(dw_ref).max())
    np.testing.assert_allclose(dx.asnumpy(), dx_ref, rtol=1e-5, atol=1e-6 * abs(dx_ref).max())
    assert layer.fp8_x_history.shape == (1,)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def test_accuracy_against_float32():
    rng = np.random.default_rng(6)
    layer, w, _ = make_layer(256, 128, bias=False, seed=7)
    x = rng.standard_normal((512, 256)).astype(F32)
    r = (rng.standard_normal((512, 128)) * 1e-4).astype(F32)
    step = grad_step(layer)
    step(Tensor(x), Tensor(r))  # warm-up: delayed scaling needs one step of amax history
    y = layer(Tensor(x)).asnumpy()
    _, (_, (dw,)) = step(Tensor(x), Tensor(r))
    y_ref = x.astype(np.float64) @ w.T
    dw_ref = r.T.astype(np.float64) @ x
    assert sqnr_db(y_ref, y) >= 18.0
    assert sqnr_db(dw_ref, dw.asnumpy()) >= 17.0


def test_statistics_count_overflow_and_underflow():
    layer, _, _ = make_layer(16, 16, bias=False, seed=8, amax_history_len=2)
    rng = np.random.default_rng(9)
    x1 = rng.standard_normal((64, 16)).astype(F32)
    x2 = x1 * F32(4.0)
    x2[0, :4] = F32(1e-9)  # flush to zero in E4M3 at this scale
    r = rng.standard_normal((64, 16)).astype(F32)
    step = grad_step(layer)
    step(Tensor(x1), Tensor(r))
    step(Tensor(x2), Tensor(r))
    amax, overflow, underflow = layer.fp8_x_stats.asnumpy()
    scale = te_scale(abs(x1).max(), 448)  # the scale used in step 2 came from step 1
    assert amax == F32(abs(x2).max())
    np.testing.assert_allclose(overflow, np.mean(np.abs(x2) * scale > 448), rtol=1e-6)
    np.testing.assert_allclose(underflow, 4 / x2.size, rtol=1e-6)
    assert overflow > 0.05


def debug_cfg(**overrides) -> ModelConfig:
    base = dict(name="debug", vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_dim=176, max_seq_len=32)
    base.update(overrides)
    return ModelConfig(**base)


def test_apply_fp8_converts_eligible_linears_and_keeps_names():
    model = build_model(debug_cfg(ffn_hidden_dim=40, num_layers=1))  # 40: not a multiple of 16, FFN stays out
    before = {p.name for p in model.trainable_params()}
    cfg = PrecisionConfig(name="fp8", compute_dtype="bfloat16", layer_dtypes={"embedding": "float32"},
                          fp8=Fp8Config(enabled=True, amax_history_len=8))
    apply_fp8(apply_precision(model, cfg), cfg)
    kinds = describe_precision(model)
    assert kinds["layers.0.attention.wq"] == "fp8" and kinds["layers.0.attention.wo"] == "fp8"
    assert kinds["output"] == "bfloat16" and kinds["tok_embeddings"] == "float32"
    assert kinds["layers.0.feed_forward.w1"] == "bfloat16"  # dims not multiples of 16
    assert kinds["layers.0.attention_norm"] == "float32"
    assert {p.name for p in model.trainable_params()} == before
    assert all(p.dtype == ms.float32 for p in model.trainable_params())  # float32 master weights
    state = [p.name for p in model.get_parameters() if not p.requires_grad]
    assert "layers.0.attention.wv.fp8_g_history" in state and len(state) == 4 * 10
    logits = model(Tensor(np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)))
    assert logits.shape == (2, 16, 128) and np.isfinite(logits.asnumpy()).all()


@pytest.mark.parametrize("skip, expected", [(["output", "w2"], "bfloat16"), (["output", "layers.1.*"], "fp8")])
def test_skip_patterns(skip, expected):
    model = build_model(debug_cfg())
    cfg = PrecisionConfig(compute_dtype="bfloat16", fp8=Fp8Config(enabled=True, skip=skip))
    apply_fp8(apply_precision(model, cfg), cfg)
    kinds = describe_precision(model)
    assert kinds["layers.0.feed_forward.w2"] == expected
    assert kinds["layers.1.attention.wq"] == ("bfloat16" if "layers.1.*" in skip else "fp8")
