"""Converter: set the attention backend and its options on every attention cell of a model."""

from __future__ import annotations

from mindspore import nn

from ascend_llm.attention import resolve_backend
from ascend_llm.config.attention import AttentionConfig


def apply_attention(model: nn.Cell, cfg: AttentionConfig) -> nn.Cell:
    """Resolve `auto` now (graphs compile against a fixed backend) and set it on each cell with a `backend`."""
    backend = resolve_backend(cfg.backend)
    for _, cell in model.cells_and_names():
        if hasattr(cell, "backend") and hasattr(cell, "block_q"):
            cell.backend = backend
            cell.block_q = cfg.block_q
            cell.block_k = cfg.block_k
    return model
