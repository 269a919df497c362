"""What a training step minimises: the objective seam between the trainer and the losses.

The trainer reads a micro-batch through the objective (`read`), differentiates `loss(model, *batch)` inside one
compiled step, logs the objective's extra scalars (`aux_names`) per step and at validation, and trains the cell
`wrap_model` returns. Next-token cross-entropy is `LanguageModeling`; other objectives (preference tuning,
distillation, contrastive alignment) are registered by name in `ascend_llm/config/objective.py` (OBJECTIVES).
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np
from mindspore import Tensor, nn

from ascend_llm.config.objective import OBJECTIVES


class Objective:
    """Base objective: the interface the trainer calls (see module docstring).

    name: the registered name. aux_names: names of the extra scalars `loss` returns (logged as `<name>` per step
    and `val_<name>` at validation: means over micro-batches and data-parallel ranks). splits_sequence: the batch
    is (tokens, labels[, segment_ids]) of shape (B, S) each, which context parallel cuts along S; an objective
    whose batch is not (False) makes the trainer refuse context_parallel_degree > 1. samples_text: the trained
    cell is a causal LM whose closing sample (train.sample_tokens) makes sense; False skips the sample.
    """

    name: str = "lm"
    aux_names: tuple[str, ...] = ()
    splits_sequence: bool = True
    samples_text: bool = True

    def wrap_model(self, model: nn.Cell) -> nn.Cell:
        """The cell to train, given the built and converted model (default: the model itself). Its
        trainable_params() are optimised and checkpointed."""
        return model

    def build_data(self, recipe, main_rank: bool):
        """None: the standard prepared corpus and packed dataset. Otherwise (prepared_all, dataset) where
        prepared_all[0] carries the tokenizer (`.path`, `.meta`) and dataset has PackedDataset's interface."""
        return None

    def read(self, dataset, rows: np.ndarray, with_segments: bool) -> tuple[np.ndarray, ...]:
        """Host side: the arrays of one micro-batch for global row indices `rows` (default: the dataset's
        (tokens, labels[, segment_ids]) int32 arrays of shape (len(rows), seq_len))."""
        return dataset.batch(rows, with_segments=with_segments)

    def loss(self, model: nn.Cell, *batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Traced inside the compiled step: (scalar float32 loss, one scalar per aux_names)."""
        raise NotImplementedError(f"objective {self.name!r} must define loss()")


class LanguageModeling(Objective):
    """Next-token cross-entropy: loss = lm_loss(model(tokens, segment_ids), labels), labels -100 ignored when the
    loss is the masked one. A model whose forward returns (logits, aux_loss) (Mixture-of-Experts: the
    load-balancing loss, already multiplied by its coefficient) adds aux_loss to the loss and logs it."""

    name = "lm"

    def __init__(self, lm_loss: Callable, with_aux_loss: bool = False):
        self.lm_loss = lm_loss
        self.with_aux_loss = with_aux_loss
        self.aux_names = ("aux_loss",) if with_aux_loss else ()

    def loss(self, model: nn.Cell, *batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        tokens, labels = batch[0], batch[1]
        segment_ids = batch[2] if len(batch) > 2 else None
        out = model(tokens, segment_ids)
        if self.with_aux_loss:
            logits, aux_loss = out
            return self.lm_loss(logits, labels) + aux_loss, (aux_loss,)
        return self.lm_loss(out, labels), ()


def build_language_modeling(recipe, lm_loss: Callable) -> LanguageModeling:
    """The `lm` objective; with a Mixture-of-Experts model (model.num_experts > 0) the aux loss is added."""
    return LanguageModeling(lm_loss, with_aux_loss=getattr(recipe.model, "num_experts", 0) > 0)


def build_objective(recipe, lm_loss: Callable) -> Objective:
    """The objective named by recipe.objective.name, built by its registered builder `fn(recipe, lm_loss)`;
    lm_loss(logits (B, S, V), labels (B, S)) -> scalar float32 is the layout's cross-entropy (vocab-parallel
    under tensor/context parallel). Raises ConfigError for an unknown name (already refused by validate())."""
    module, _, function = OBJECTIVES[recipe.objective.name].partition(":")
    return getattr(importlib.import_module(module), function)(recipe, lm_loss)
