"""The MindSpore Llama forward equals an independent float64 NumPy implementation with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.config.model import ModelConfig
from ascend_llm.models import build_model, count_params


def np_rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x, theta):
    """x: (B, H, S, D); rotate-half RoPE computed from the published formula in float64."""
    seq, dim = x.shape[2], x.shape[3]
    inv = theta ** (-np.arange(0, dim, 2) / dim)
    ang = np.arange(seq)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_forward(w: dict, cfg: ModelConfig, tokens: np.ndarray) -> np.ndarray:
    batch, seq = tokens.shape
    hd, nh, nkv = cfg.dim // cfg.num_heads, cfg.num_heads, cfg.num_kv_heads
    h = w["tok_embeddings.weight"][tokens]
    causal = np.tril(np.ones((seq, seq), bool))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        x = np_rmsnorm(h, w[p + "attention_norm.weight"], cfg.norm_eps)

        def proj(name, heads, x=x, p=p):
            y = x @ w[p + f"attention.{name}.weight"].T
            if cfg.qkv_bias:
                y = y + w[p + f"attention.{name}.bias"]
            return y.reshape(batch, seq, heads, hd).transpose(0, 2, 1, 3)

        q, k, v = np_rope(proj("wq", nh), cfg.rope_theta), np_rope(proj("wk", nkv), cfg.rope_theta), proj("wv", nkv)
        out = np.empty_like(q)
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[:, head] @ k[:, kv].transpose(0, 2, 1) / np.sqrt(hd)
            s = np.where(causal, s, -np.inf)
            prob = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (prob / prob.sum(-1, keepdims=True)) @ v[:, kv]
        h = h + out.transpose(0, 2, 1, 3).reshape(batch, seq, nh * hd) @ w[p + "attention.wo.weight"].T
        x = np_rmsnorm(h, w[p + "ffn_norm.weight"], cfg.norm_eps)
        gate = x @ w[p + "feed_forward.w1.weight"].T
        up = x @ w[p + "feed_forward.w3.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "feed_forward.w2.weight"].T
    h = np_rmsnorm(h, w["norm.weight"], cfg.norm_eps)
    head = w["tok_embeddings.weight"] if cfg.tie_embeddings else w["output.weight"]
    return h @ head.T


CASES = {
    "mha": dict(num_heads=4, num_kv_heads=4),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mqa_tied_bias": dict(num_heads=4, num_kv_heads=1, tie_embeddings=True, qkv_bias=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_float64_numpy(case):
    cfg = ModelConfig(name=case, vocab_size=97, dim=32, num_layers=2, ffn_hidden_dim=48, max_seq_len=64,
                      rope_theta=500.0, init_std=0.2, **CASES[case])
    model = build_model(cfg, seed=3)
    weights = {}
    rng = np.random.default_rng(7)
    for p in model.trainable_params():  # perturb norms and biases so they are exercised too
        value = p.asnumpy().astype(np.float64)
        if p.name.endswith(("norm.weight", ".bias")):
            value = value + rng.normal(0, 0.3, value.shape)
            p.set_data(Tensor(value.astype(np.float32)))
        weights[p.name] = p.asnumpy().astype(np.float64)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    got = model(Tensor(tokens)).asnumpy()
    ref = np_forward(weights, cfg, tokens)
    assert got.shape == (2, 24, cfg.vocab_size)
    err = np.abs(got - ref).max()
    assert err <= 1e-5, f"max abs error {err:.2e} vs float64 reference (logit scale {np.abs(ref).max():.2f})"


def test_causality_future_tokens_do_not_change_past_logits():
    cfg = ModelConfig(name="c", vocab_size=50, dim=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      ffn_hidden_dim=48, max_seq_len=32)
    model = build_model(cfg)
    a = np.arange(16, dtype=np.int32).reshape(1, 16) % 50
    b = a.copy()
    b[0, 10:] = 3
    la, lb = model(Tensor(a)).asnumpy(), model(Tensor(b)).asnumpy()
    np.testing.assert_array_equal(la[0, :10], lb[0, :10])
    assert np.abs(la[0, 10:] - lb[0, 10:]).max() > 0


@pytest.mark.parametrize("flavor, published", [("llama_1b", 1.24e9), ("llama2_7b", 6.74e9),
                                               ("llama3_8b", 8.03e9), ("qwen2_7b", 7.62e9)])
def test_large_flavors_compose_with_published_parameter_counts(flavor, published):
    from ascend_llm.compose import compose_recipe

    recipe = compose_recipe([f"model={flavor}"])
    assert recipe.model.name == flavor
    assert abs(count_params(recipe.model) - published) / published < 0.005


def test_count_params_matches_built_model():
    from ascend_llm.compose import compose_recipe

    for flavor in ("debug", "tiny"):
        cfg = compose_recipe([f"model={flavor}"]).model
        model = build_model(cfg)
        assert sum(p.size for p in model.trainable_params()) == count_params(cfg)
