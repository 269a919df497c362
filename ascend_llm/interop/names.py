"""Tensor name maps between the toolkit's stable sub-cell names and the Hugging Face Llama/Qwen layout.

Llama, Qwen2 and Qwen3 share one layout (`model.layers.N.self_attn.q_proj.weight`, ...); Qwen2 adds q/k/v
biases, Qwen3 adds `self_attn.q_norm` / `k_norm`, tied models omit `lm_head.weight`. Both sides store
linear weights as (out_features, in_features) and use the rotate-half RoPE layout, so tensors map 1:1.
"""

from __future__ import annotations

import re

_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    # MoE layers (Qwen2-MoE / Qwen3-MoE); the stacked experts are mapped by interop/hf_moe.py
    "feed_forward.router.weight": "mlp.gate.weight",
    "feed_forward.shared_expert.w1.weight": "mlp.shared_expert.gate_proj.weight",
    "feed_forward.shared_expert.w2.weight": "mlp.shared_expert.down_proj.weight",
    "feed_forward.shared_expert.w3.weight": "mlp.shared_expert.up_proj.weight",
    "feed_forward.shared_expert_gate.weight": "mlp.shared_expert_gate.weight",
}
_GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER_REVERSE = {v: k for k, v in _LAYER.items()}
_GLOBAL_REVERSE = {v: k for k, v in _GLOBAL.items()}
_TOOLKIT_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf(name: str) -> str | None:
    """Toolkit parameter name -> Hugging Face tensor name; None for names with no HF counterpart."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = _TOOLKIT_LAYER.match(name)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}"
    return None


def from_hf(name: str) -> str | None:
    """Hugging Face tensor name -> toolkit parameter name; None for names the toolkit does not model."""
    if name in _GLOBAL_REVERSE:
        return _GLOBAL_REVERSE[name]
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _LAYER_REVERSE:
        return f"layers.{match.group(1)}.{_LAYER_REVERSE[match.group(2)]}"
    return None


def to_hf_module(path: str) -> str | None:
    """Toolkit cell path (`layers.0.attention.wq`, `output`) -> Hugging Face module path
    (`model.layers.0.self_attn.q_proj`, `lm_head`), the prefix of its `.weight`/`.qweight`/... tensors; None
    when the cell has no HF counterpart."""
    name = to_hf(f"{path}.weight")
    return None if name is None else name[: -len(".weight")]
