"""Model architecture schema (recipe group `model/`): architecture only, no precision or layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ascend_llm.config.checks import one_of, positive
from ascend_llm.errors import ConfigError

ROPE_SCALING_TYPES = ("none", "llama3")


@dataclass
class ModelConfig:
    """Llama-family architecture.

    head_dim_override: per-head width when it is not dim / num_heads (Qwen3: 128 with dim 2560 / 32 heads);
    0 means dim // num_heads. qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3). rope_scaling_type
    `llama3` applies Llama 3.1's frequency scaling with rope_scaling_factor, rope_low_freq_factor,
    rope_high_freq_factor and rope_original_max_seq_len (see models/llama.py: rope_inv_freq).
    """

    name: str = "tiny"
    vocab_size: int = 4096
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    ffn_hidden_dim: int = 688
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    head_dim_override: int = 0
    qk_norm: bool = False
    rope_scaling_type: str = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    # Mixture-of-Experts (Qwen2-MoE / Qwen3-MoE; models/moe.py). num_experts 0: every layer dense. Layer i is
    # sparse iff num_experts > 0, i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0 (transformers).
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k
    moe_ffn_hidden_dim: int = 0  # per-expert SwiGLU width (HF moe_intermediate_size)
    shared_expert_ffn_hidden_dim: int = 0  # Qwen2-MoE shared expert width, 0: none
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum 1
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001  # load-balancing loss coefficient (Switch / transformers)
    router_z_loss_coef: float = 0.0  # router z-loss coefficient (ST-MoE), 0: off
    # A model directory (Hugging Face, toolkit checkpoint or run): architecture, weights and tokenizer come from it
    # (compose/pretrained.py, interop/pretrained.py).
    pretrained: Optional[str] = None

    def is_sparse_layer(self, index: int) -> bool:
        """Whether layer `index` is a Mixture-of-Experts layer (transformers' Qwen2-MoE / Qwen3-MoE rule)."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def head_dim(self) -> int:
        """Per-head width: head_dim_override, or dim // num_heads when it is 0."""
        return self.head_dim_override or self.dim // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        """Raises ConfigError naming the field: a size <= 0, dim not divisible by num_heads (without an override), an
        odd head_dim (RoPE rotates pairs), num_kv_heads not dividing num_heads, an unknown rope_scaling_type, or
        llama3 rope scaling with a factor <= 0 or high_freq_factor <= low_freq_factor."""
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_dim",
                     "max_seq_len", "rope_theta", "norm_eps", "init_std"):
            positive(f"{prefix}.{name}", getattr(self, name))
        if self.head_dim_override < 0:
            raise ConfigError(f"{prefix}.head_dim_override", self.head_dim_override, "must be >= 0 (0: dim/num_heads)")
        if not self.head_dim_override and self.dim % self.num_heads:
            raise ConfigError(f"{prefix}.dim", self.dim, f"must be divisible by model.num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}.dim", self.dim, f"head_dim={self.head_dim} must be even (RoPE)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{prefix}.num_kv_heads", self.num_kv_heads,
                              f"must divide model.num_heads={self.num_heads}")
        one_of(f"{prefix}.qkv_bias", self.qkv_bias, (True, False))
        one_of(f"{prefix}.qk_norm", self.qk_norm, (True, False))
        self._validate_moe(prefix)
        one_of(f"{prefix}.rope_scaling_type", self.rope_scaling_type, ROPE_SCALING_TYPES)
        if self.rope_scaling_type == "llama3":
            for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                         "rope_original_max_seq_len"):
                positive(f"{prefix}.{name}", getattr(self, name))
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ConfigError(f"{prefix}.rope_high_freq_factor", self.rope_high_freq_factor,
                                  f"must be > model.rope_low_freq_factor={self.rope_low_freq_factor}")

    def _validate_moe(self, prefix: str) -> None:
        """ConfigError naming the MoE field: num_experts < 0; with experts, top-k outside 1..num_experts, a
        non-positive expert width or sparse step, a negative shared width or loss coefficient, or mlp_only_layers
        naming a layer that does not exist."""
        if self.num_experts < 0:
            raise ConfigError(f"{prefix}.num_experts", self.num_experts, "must be >= 0 (0: dense)")
        if not self.num_experts:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"{prefix}.num_experts_per_tok", self.num_experts_per_tok,
                              f"must be in 1..model.num_experts={self.num_experts}")
        positive(f"{prefix}.moe_ffn_hidden_dim", self.moe_ffn_hidden_dim)
        positive(f"{prefix}.decoder_sparse_step", self.decoder_sparse_step)
        for name in ("shared_expert_ffn_hidden_dim", "router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "must be >= 0")
        one_of(f"{prefix}.norm_topk_prob", self.norm_topk_prob, (True, False))
        bad = [i for i in self.mlp_only_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)]
        if bad:
            raise ConfigError(f"{prefix}.mlp_only_layers", list(self.mlp_only_layers),
                              f"must be layer indices in 0..{self.num_layers - 1}")
