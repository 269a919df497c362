"""Hugging Face `config.json` <-> `ModelConfig` for the Llama, Qwen2 and Qwen3 families.

Reads both key styles: transformers >= 5 (`rope_parameters`, `dtype`) and older (`rope_theta` +
`rope_scaling`, `torch_dtype`). Anything the toolkit's model does not compute (sliding windows, MoE, biases on
o_proj/MLP, other activations or RoPE types, quantized weights) is refused with an InteropError naming the key.
"""

from __future__ import annotations

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError, UserInputError

FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe"}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe")
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_HF_DTYPE = {v: k for k, v in DTYPES.items()}


def family_of(raw: dict) -> str:
    """`llama`, `qwen2` or `qwen3` from `architectures` (or `model_type` when architectures is absent)."""
    archs = raw.get("architectures") or []
    if archs:
        if len(archs) != 1 or archs[0] not in FAMILIES:
            raise InteropError("config.json:architectures", archs, "allowed: " + ", ".join(FAMILIES))
        return FAMILIES[archs[0]]
    model_type = raw.get("model_type")
    if model_type not in FAMILIES.values():
        raise InteropError("config.json:model_type", model_type, "allowed: " + ", ".join(FAMILIES.values()))
    return model_type


def _rope(raw: dict) -> dict:
    """RoPE fields of ModelConfig from `rope_parameters` (new) or `rope_theta` + `rope_scaling` (old)."""
    key = "rope_parameters" if isinstance(raw.get("rope_parameters"), dict) else "rope_scaling"
    params = dict(raw.get(key) or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if rope_type == "llama3":
        fields = {"rope_scaling_factor": "factor", "rope_low_freq_factor": "low_freq_factor",
                  "rope_high_freq_factor": "high_freq_factor",
                  "rope_original_max_seq_len": "original_max_position_embeddings"}
        for ours, theirs in fields.items():
            if not isinstance(params.get(theirs), (int, float)):
                raise InteropError(f"config.json:{key}.{theirs}", params.get(theirs), "a number is required (llama3)")
            out[ours] = params[theirs]
        out["rope_scaling_type"] = "llama3"
        out["rope_original_max_seq_len"] = int(out["rope_original_max_seq_len"])
    elif rope_type != "default":
        raise InteropError(f"config.json:{key}.rope_type", rope_type, "allowed: default, llama3")
    return out


def _refuse_unsupported(raw: dict, family: str) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise InteropError("config.json:hidden_act", raw["hidden_act"], "allowed: silu (SwiGLU)")
    if raw.get("use_sliding_window"):
        raise InteropError("config.json:use_sliding_window", True, "sliding-window attention is not supported")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise InteropError("config.json:layer_types", sorted(set(layer_types)), "allowed: full_attention only")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if raw.get(key) and (family not in MOE_FAMILIES or key == "n_routed_experts"):
            raise InteropError(f"config.json:{key}", raw[key], "mixture-of-experts models are not supported")
    if raw.get("quantization_config"):
        raise InteropError("config.json:quantization_config", raw["quantization_config"].get("quant_method"),
                           "quantized checkpoints are not supported; use unquantized weights")
    if family not in ("qwen2", "qwen2_moe") and raw.get("attention_bias"):
        raise InteropError("config.json:attention_bias", True, "allowed: false (o_proj bias is not supported)")
    if raw.get("mlp_bias"):
        raise InteropError("config.json:mlp_bias", True, "allowed: false")


def dtype_of(raw: dict) -> str:
    """Storage dtype named by `dtype` or `torch_dtype`: bf16, fp16 or fp32 (fp32 when absent)."""
    key = "dtype" if "dtype" in raw else "torch_dtype"
    value = raw.get(key) or "float32"
    if value not in DTYPES:
        raise InteropError(f"config.json:{key}", value, "allowed: " + ", ".join(DTYPES))
    return DTYPES[value]


MAX_TOKEN_ID = 2**31 - 1  # token ids are int32 in the model and the engine
MAX_POSITIONS = 1 << 21  # RoPE tables are (max_seq_len, head_dim) arrays: 2M positions covers Qwen2.5-1M


def _size(raw: dict, key: str, default: int | None = None, limit: int = MAX_TOKEN_ID) -> int:
    """A positive integer field of config.json, at most `limit`; InteropError naming the key otherwise."""
    if key not in raw or raw[key] is None:
        if default is None:
            raise InteropError(f"config.json:{key}", "missing", "required for a Llama/Qwen config")
        return default
    value = raw[key]
    if type(value) is not int or not 0 < value <= limit:
        raise InteropError(f"config.json:{key}", value, f"must be an integer from 1 to {limit}")
    return value


def _moe(raw: dict, family: str) -> dict:
    """MoE fields of ModelConfig from a qwen2_moe / qwen3_moe config.json (Qwen3-MoE: `num_experts` on the Hub,
    `num_local_experts` as transformers 5.25 writes it)."""
    key = "num_local_experts" if raw.get("num_experts") is None and "num_local_experts" in raw else "num_experts"
    layers = raw.get("mlp_only_layers") or []
    if not isinstance(layers, list) or not all(type(i) is int for i in layers):
        raise InteropError("config.json:mlp_only_layers", layers, "must be a list of layer indices")
    shared = 0
    if family == "qwen2_moe" and raw.get("shared_expert_intermediate_size") not in (0, None):
        shared = _size(raw, "shared_expert_intermediate_size")
    norm = raw.get("norm_topk_prob", False)
    if norm not in (True, False):
        raise InteropError("config.json:norm_topk_prob", norm, "must be true or false")
    coef = raw.get("router_aux_loss_coef", 0.001)
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0:
        raise InteropError("config.json:router_aux_loss_coef", coef, "must be a number >= 0")
    return {"num_experts": _size(raw, key), "num_experts_per_tok": _size(raw, "num_experts_per_tok"),
            "moe_ffn_hidden_dim": _size(raw, "moe_intermediate_size"), "shared_expert_ffn_hidden_dim": shared,
            "norm_topk_prob": norm, "decoder_sparse_step": _size(raw, "decoder_sparse_step", default=1),
            "mlp_only_layers": list(layers), "router_aux_loss_coef": float(coef)}


def model_config_from_hf(raw: dict, name: str = "hf") -> ModelConfig:
    """ModelConfig for a Hugging Face config dict; InteropError names the first unsupported, missing or malformed
    key (a size that is not a positive integer, or beyond what the model can index). Sizes are not yet compared
    with the weights: interop/hf_files.check_config_fits does that before a model is built."""
    if not isinstance(raw, dict):
        raise InteropError("config.json", type(raw).__name__, "must be a JSON object")
    heads, dim = _size(raw, "num_attention_heads"), _size(raw, "hidden_size")
    head_dim = _size(raw, "head_dim", default=max(dim // heads, 1))
    try:  # a value of the wrong JSON type anywhere (a list for a number, a string for an object)
        family = family_of(raw)
        _refuse_unsupported(raw, family)
        dtype_of(raw)
        rope = _rope(raw)
        cfg = ModelConfig(
            name=name, vocab_size=_size(raw, "vocab_size"), dim=dim, num_layers=_size(raw, "num_hidden_layers"),
            num_heads=heads, num_kv_heads=_size(raw, "num_key_value_heads", default=heads),
            ffn_hidden_dim=_size(raw, "intermediate_size"),
            max_seq_len=_size(raw, "max_position_embeddings", default=2048, limit=MAX_POSITIONS),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            qkv_bias=family == "qwen2" or (family == "qwen2_moe" and bool(raw.get("qkv_bias", True))),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            init_std=float(raw.get("initializer_range", 0.02)),
            head_dim_override=0 if head_dim * heads == dim else head_dim, qk_norm=family in ("qwen3", "qwen3_moe"),
            **rope, **(_moe(raw, family) if family in MOE_FAMILIES else {}))
    except UserInputError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise InteropError("config.json", "malformed", str(exc)) from None
    cfg.validate(prefix="config.json")
    return cfg


def family_for(cfg: ModelConfig) -> str:
    """The HF family whose layout computes this ModelConfig: with experts qwen3_moe (qk_norm) or qwen2_moe (shared
    expert); else qwen3 (qk_norm), qwen2 (qkv bias) or llama. InteropError when no family computes it (q/k norm
    together with q/k/v bias; experts with both or neither of q/k norm and a shared expert)."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise InteropError("model.qkv_bias", True, "no Hugging Face family has both q/k norm and q/k/v bias")
    if cfg.num_experts:
        if cfg.qk_norm and cfg.shared_expert_ffn_hidden_dim:
            raise InteropError("model.shared_expert_ffn_hidden_dim", cfg.shared_expert_ffn_hidden_dim,
                               "Qwen3-MoE (q/k norm) has no shared expert; no Hugging Face family computes both")
        if not cfg.qk_norm and not cfg.shared_expert_ffn_hidden_dim:
            raise InteropError("model.shared_expert_ffn_hidden_dim", 0, "Qwen2-MoE (no q/k norm) has a shared "
                               "expert: set it > 0, or qk_norm for the Qwen3-MoE layout")
        return "qwen3_moe" if cfg.qk_norm else "qwen2_moe"
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def hf_config_from_model(cfg: ModelConfig, dtype: str, special: dict | None = None,
                         quantization: dict | None = None) -> dict:
    """config.json dict of the family that computes `cfg` (see family_for), the one builder of both exports
    (`convert --to hf` and the HF GPTQ layout). transformers >= 5 keys (`rope_parameters`, `dtype`) plus the keys
    older readers use (`rope_theta`, `rope_scaling` for llama3 RoPE, `torch_dtype`); `special`: bos/eos/pad ids
    (eos may be a list); `quantization`: written as `quantization_config`. dtype: bf16, fp16 or fp32."""
    family = family_for(cfg)
    arch = {v: k for k, v in FAMILIES.items()}[family]
    scaling = {}
    if cfg.rope_scaling_type == "llama3":  # Llama 3.1 (transformers' _compute_llama3_parameters)
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **scaling}
    raw = {
        "architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_hidden_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "rope_parameters": rope,
        "dtype": _HF_DTYPE[dtype], "use_cache": True, "attention_dropout": 0.0,
        # transformers < 5 reads these instead of rope_parameters / dtype
        "rope_theta": cfg.rope_theta, "torch_dtype": _HF_DTYPE[dtype],
    }
    if scaling:
        raw["rope_scaling"] = scaling
    if family in MOE_FAMILIES:
        raw.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_ffn_hidden_dim, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
                   router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
        if family == "qwen2_moe":
            raw.update(shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_dim, qkv_bias=cfg.qkv_bias)
    if family not in ("qwen2", "qwen2_moe"):
        raw.update(attention_bias=False)
    if family == "llama":
        raw.update(mlp_bias=False, pretraining_tp=1)
    else:
        raw.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                   layer_types=["full_attention"] * cfg.num_layers)
    raw.update(special or {})
    if quantization:
        raw["quantization_config"] = dict(quantization)
    return raw
