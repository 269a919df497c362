"""Attention backend schema (recipe group `attention/`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ascend_llm.config.checks import one_of, positive

BACKENDS = ("auto", "naive", "segmented", "fused")


@dataclass
class AttentionConfig:
    """backend: naive | segmented | fused | auto (fused on Ascend, segmented elsewhere; on CPU segmented is
    faster than naive at training lengths too, see `segmented.auto_block_size`);
    block_q / block_k: query and key block sizes of the segmented backend; null (default) picks them per
    sequence length (`ascend_llm.attention.segmented.auto_block_size`), an integer overrides (sequences shorter
    than a block use one block; any sequence length works, it need not be a multiple)."""

    backend: str = "auto"
    block_q: Optional[int] = None
    block_k: Optional[int] = None

    def validate(self, prefix: str = "attention") -> None:
        """Raises ConfigError when backend is not one of BACKENDS or a block size is given and not > 0."""
        one_of(f"{prefix}.backend", self.backend, BACKENDS)
        for name in ("block_q", "block_k"):
            if getattr(self, name) is not None:
                positive(f"{prefix}.{name}", getattr(self, name))
