"""Per-layer precision policy: dtype resolution, bf16 emulation and fp16 GEMMs against NumPy references,
float32 master weights, and config errors that name the field."""

from __future__ import annotations

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
from mindspore import Tensor, nn

from ascend_llm.compose import compose_recipe
from ascend_llm.config.model import ModelConfig
from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.errors import ConfigError
from ascend_llm.models.llama import Embedding, RMSNorm, build_model
from ascend_llm.precision import apply_precision, describe_precision, resolve_layer_dtypes
from ascend_llm.precision.policy import PrecisionDense

F32 = np.float32
SEED_MAP = {"linear": "float16", "conv": "bfloat16", "embedding": "float32"}


class Toy(nn.Cell):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = Embedding(32, 16)
        self.conv = nn.Conv1d(16, 16, 3, pad_mode="same")
        self.proj = nn.Dense(16, 16)
        self.norm = RMSNorm(16)
        self.output = nn.Dense(16, 32, has_bias=False)


def test_classic_map_resolves_by_kind_with_norms_in_float32():
    cfg = PrecisionConfig(layer_dtypes=dict(SEED_MAP), loss_scale="dynamic")
    cfg.validate()
    assert resolve_layer_dtypes(Toy(), cfg) == {"tok_embeddings": "float32", "conv": "bfloat16", "proj": "float16",
                                                "norm": "float32", "output": "float16"}


def test_most_specific_override_wins():
    model = build_model(ModelConfig(name="debug", vocab_size=64, dim=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, ffn_hidden_dim=64, max_seq_len=16))
    cfg = PrecisionConfig(compute_dtype="bfloat16", layer_dtypes={
        "linear": "float16", "w2": "float32", "layers.1.*": "float32", "layers.1.attention.wq": "bfloat16"},
        loss_scale="dynamic")
    dtypes = resolve_layer_dtypes(model, cfg)
    assert dtypes["layers.0.attention.wq"] == "float16"  # kind
    assert dtypes["layers.0.feed_forward.w2"] == "float32"  # sub-cell name beats kind
    assert dtypes["layers.1.feed_forward.w1"] == "float32"  # path pattern beats kind
    assert dtypes["layers.1.attention.wq"] == "bfloat16"  # the longer pattern beats layers.1.*
    assert dtypes["tok_embeddings"] == "bfloat16"  # the default compute dtype
    assert dtypes["norm"] == "float32"


def dense_layer(dtype: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    dense = nn.Dense(24, 8)
    w = (rng.standard_normal((8, 24)) * 0.3).astype(F32)
    b = rng.standard_normal(8).astype(F32)
    dense.weight.set_data(Tensor(w))
    dense.bias.set_data(Tensor(b))
    return PrecisionDense(dense.weight, dense.bias, dtype, emulate_bf16=True), w, b


def bf16(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.bfloat16).astype(np.float64)


def test_bf16_emulation_rounds_every_gemm_operand():
    layer, w, b = dense_layer("bfloat16")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 24)).astype(F32)
    r = rng.standard_normal((5, 8)).astype(F32)

    def loss(x, r):
        return (layer(x) * r).sum()

    _, (dx, (dw, db)) = ms.jit(ms.value_and_grad(loss, 0, [layer.weight, layer.bias]))(Tensor(x), Tensor(r))
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), bf16(x) @ bf16(w).T + b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx.asnumpy(), bf16(r) @ bf16(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw.asnumpy(), bf16(r).T @ bf16(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db.asnumpy(), r.sum(0), rtol=1e-6)
    plain = x.astype(np.float64) @ w.T + b
    assert not np.allclose(layer(Tensor(x)).asnumpy(), plain, rtol=1e-6, atol=0)  # it really rounds


def test_fp16_gemm_matches_a_float16_reference():
    layer, w, b = dense_layer("float16")
    x = np.random.default_rng(2).standard_normal((5, 24)).astype(F32)
    ref = (x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), ref.astype(np.float16).astype(np.float64) + b,
                               rtol=2e-3, atol=2e-3)


def test_apply_precision_keeps_float32_master_weights_and_names():
    model = build_model(ModelConfig(name="debug", vocab_size=64, dim=32, num_layers=1, num_heads=4,
                                    num_kv_heads=2, ffn_hidden_dim=64, max_seq_len=16))
    names = [p.name for p in model.trainable_params()]
    cfg = compose_recipe(["precision=bf16"]).precision
    apply_precision(model, cfg)
    assert [p.name for p in model.trainable_params()] == names
    assert all(p.dtype == ms.float32 for p in model.trainable_params())
    kinds = describe_precision(model)
    assert kinds["layers.0.attention.wk"] == "bfloat16" and kinds["output"] == "bfloat16"
    assert kinds["tok_embeddings"] == "float32" and kinds["layers.0.ffn_norm"] == "float32"
    logits = model(Tensor(np.arange(16, dtype=np.int32).reshape(1, 16)))
    assert logits.dtype == ms.float32 and np.isfinite(logits.asnumpy()).all()


def test_seed_map_on_a_model_with_conv_and_embedding():
    model = Toy()
    cfg = compose_recipe(["precision=seed_map"]).precision
    apply_precision(model, cfg)
    kinds = describe_precision(model)
    assert kinds["proj"] == "float16" and kinds["output"] == "float16" and kinds["tok_embeddings"] == "float32"
    assert kinds["conv"] == "float32"  # no bf16 conv kernel on CPU: kept float32 (logged)


@pytest.mark.parametrize("overrides, field", [
    (["precision=bf16", "+precision.layer_dtypes.norm=float16"], "precision.layer_dtypes.norm"),
    (["precision=bf16", "+precision.layer_dtypes.wq=float8"], "precision.layer_dtypes.wq"),
    (["precision=fp16", "precision.loss_scale=none"], "precision.loss_scale"),
    (["precision=fp16", "precision.loss_scale_factor=1"], "precision.loss_scale_factor"),
    (["precision=fp32", "precision.dynamic.enabled=true"], "precision.dynamic.enabled"),
    (["precision=fp8", "precision.fp8.format=e3m4"], "precision.fp8.format"),
    (["precision=fp8", "precision.fp8.amax_history_len=0"], "precision.fp8.amax_history_len"),
    (["precision=fp8_dynamic", "precision.dynamic.max_level=fp8"], "precision.dynamic.max_level"),
])
def test_bad_precision_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        compose_recipe(overrides)
    assert info.value.field == field


def test_low_precision_embedding_rounds_the_looked_up_rows():
    model = Toy()
    table = np.random.default_rng(3).standard_normal((32, 16)).astype(F32)
    model.tok_embeddings.weight.set_data(Tensor(table))
    apply_precision(model, PrecisionConfig(layer_dtypes={"embedding": "bfloat16"}))
    assert describe_precision(model)["tok_embeddings"] == "bfloat16"
    tokens = np.array([[3, 0, 31]], np.int32)
    np.testing.assert_array_equal(model.tok_embeddings(Tensor(tokens)).asnumpy(), bf16(table[tokens]).astype(F32))
    assert model.tok_embeddings.weight.dtype == ms.float32
