"""Converter: replace every `core_attention` sub-cell with one built from the recipe's `attention/` group."""

from __future__ import annotations

from mindspore import nn

from ascend_llm.attention.core import CoreAttention
from ascend_llm.config.attention import AttentionConfig


def apply_attention(model: nn.Cell, cfg: AttentionConfig) -> nn.Cell:
    """Resolve `auto` now (graphs compile against a fixed backend) and install a new `CoreAttention` in each
    cell that has a `core_attention` attribute. Returns the model (mutated in place). Raises ValueError for an
    unknown backend (recipes are validated before this)."""
    for _, cell in list(model.cells_and_names()):
        if isinstance(getattr(cell, "core_attention", None), CoreAttention):
            cell.core_attention = CoreAttention(cfg, causal=cell.core_attention.causal)
    return model
