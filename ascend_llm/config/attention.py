"""Attention backend schema (recipe group `attention/`)."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import one_of, positive

BACKENDS = ("auto", "naive", "segmented", "fused")


@dataclass
class AttentionConfig:
    """backend: naive | segmented | fused | auto (fused on Ascend, segmented elsewhere);
    block_q / block_k: query and key block sizes of the segmented backend (sequences shorter than a block use
    one block; any sequence length works, it need not be a multiple)."""

    backend: str = "naive"
    block_q: int = 512
    block_k: int = 512

    def validate(self, prefix: str = "attention") -> None:
        one_of(f"{prefix}.backend", self.backend, BACKENDS)
        positive(f"{prefix}.block_q", self.block_q)
        positive(f"{prefix}.block_k", self.block_k)
