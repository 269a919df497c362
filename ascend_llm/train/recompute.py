"""Activation recompute (activation checkpointing) as a model converter.

- full: every decoder layer (`layers.N`) keeps only its input and recomputes its forward in the backward;
- selective: only the attention core (`core_attention`) is recomputed (Korthikanti et al. 2022, "selective
  activation recomputation"): on Ascend with the fused kernel this keeps the output and log-sum-exp only;
- none: nothing.
It uses MindSpore's `Cell.recompute()`. On CPU graph mode keeps a buffer for every intermediate anyway
(see DESIGN.md), so recompute changes no numbers and saves no memory there; the planner counts it for Ascend.
"""

from __future__ import annotations

from mindspore import nn

from ascend_llm.attention.core import CoreAttention
from ascend_llm.config.train import RECOMPUTE_MODES


def apply_recompute(model: nn.Cell, mode: str) -> nn.Cell:
    """Mark the cells `mode` names for recompute; returns the model (mutated). ValueError for another mode
    (recipes are validated before this)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"train.recompute={mode!r}: allowed: {', '.join(RECOMPUTE_MODES)}")
    if mode == "full":
        for layer in getattr(model, "layers", []):
            layer.recompute()
    elif mode == "selective":
        for _, cell in model.cells_and_names():
            if isinstance(cell, CoreAttention):
                cell.recompute()
    return model
