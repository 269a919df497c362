"""LoRA converter: the adapted Dense equals W x + b + (alpha/r) B A x in float64 NumPy; only the adapter trains;
merged weights (and their Hugging Face export) give the unmerged model's logits."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import ConfigError
from ascend_llm.interop import hf
from ascend_llm.interop.export import export_hf
from ascend_llm.interop.source import open_model
from ascend_llm.models.llama import build_model
from ascend_llm.models.lora import LoraConfig, LoraDense, apply_lora, merged_weights


@pytest.fixture(scope="module", autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


def test_lora_dense_matches_numpy():
    rng = np.random.default_rng(0)
    dense = nn.Dense(6, 5, has_bias=True)
    w, b = rng.normal(size=(5, 6)), rng.normal(size=5)
    dense.weight.set_data(Tensor(w.astype(np.float32)))
    dense.bias.set_data(Tensor(b.astype(np.float32)))
    cell = LoraDense(dense, rank=2, alpha=4.0, dropout=0.0, rng=rng)
    a, bb = rng.normal(size=(2, 6)), rng.normal(size=(5, 2))
    cell.lora_a.set_data(Tensor(a.astype(np.float32)))
    cell.lora_b.set_data(Tensor(bb.astype(np.float32)))
    x = rng.normal(size=(3, 4, 6)).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 @ w.astype(np.float32).astype(np.float64).T + b.astype(np.float32) \
        + 2.0 * (x64 @ a.astype(np.float32).astype(np.float64).T) @ bb.astype(np.float32).astype(np.float64).T
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)


def _model():
    cfg = ModelConfig(vocab_size=96, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=48,
                      max_seq_len=32, qkv_bias=True)
    return cfg, build_model(cfg, seed=1)


def test_only_the_adapter_trains_and_merge_reproduces_logits(tmp_path):
    cfg, model = _model()
    lora = LoraConfig(rank=3, alpha=6.0, targets=["wq", "wv", "w2"])
    trainable = apply_lora(model, lora)
    hd = cfg.head_dim
    per_layer = 3 * (cfg.dim + cfg.num_heads * hd) + 3 * (cfg.dim + cfg.num_kv_heads * hd) \
        + 3 * (cfg.ffn_hidden_dim + cfg.dim)
    assert trainable == cfg.num_layers * per_layer
    names = sorted(p.name for p in model.trainable_params())
    assert len(names) == 6 * cfg.num_layers and all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in names)
    assert "layers.0.attention.wq.lora_a" in names
    rng = np.random.default_rng(3)
    for p in model.trainable_params():  # B starts at zero: give the update a value to merge
        p.set_data(Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    ids = Tensor(rng.integers(0, cfg.vocab_size, size=(2, 12)).astype(np.int32))
    unmerged = model(ids).asnumpy()
    merged = merged_weights(model)
    plain = build_model(cfg, seed=9)
    hf.assign_weights(plain, merged)
    np.testing.assert_allclose(plain(ids).asnumpy(), unmerged, rtol=0, atol=1e-5)
    out = export_hf(tmp_path / "merged", cfg, merged, dtype="fp32")
    exported = open_model(out, build=False).weights
    reloaded = build_model(cfg)
    hf.assign_weights(reloaded, exported)
    np.testing.assert_allclose(reloaded(ids).asnumpy(), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("field,value", [("rank", 0), ("alpha", 0.0), ("dropout", 1.0), ("targets", ["wx"])])
def test_bad_lora_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"lora.{field}="):
        LoraConfig(**{field: value}).validate()
