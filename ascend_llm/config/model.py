"""Model architecture schema (recipe group `model/`): architecture only, no precision or layout."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import one_of, positive
from ascend_llm.errors import ConfigError


@dataclass
class ModelConfig:
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_dim",
                     "max_seq_len", "rope_theta", "norm_eps", "init_std"):
            positive(f"{prefix}.{name}", getattr(self, name))
        if self.dim % self.num_heads:
            raise ConfigError(f"{prefix}.dim", self.dim, f"must be divisible by model.num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}.dim", self.dim, f"head_dim=dim/num_heads={self.head_dim} must be even (RoPE)")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{prefix}.num_kv_heads", self.num_kv_heads,
                              f"must divide model.num_heads={self.num_heads}")
        one_of(f"{prefix}.qkv_bias", self.qkv_bias, (True, False))
