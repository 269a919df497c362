"""Build the model and apply the converters in one fixed order: attention, precision, FP8.

This is the only place that combines model code with precision strategies (cf. torchtitan's
parallelize.py); data parallelism needs no model change here (gradients are all-reduced in the step).
Each converter receives only its own sub-config.
"""

from __future__ import annotations

from mindspore import nn

from ascend_llm.attention.apply import apply_attention
from ascend_llm.config.root import RecipeConfig
from ascend_llm.models import build_model
from ascend_llm.precision import apply_fp8, apply_precision


def build_training_model(recipe: RecipeConfig) -> nn.Cell:
    model = build_model(recipe.model, seed=recipe.train.seed)
    apply_attention(model, recipe.attention)
    apply_precision(model, recipe.precision)
    apply_fp8(model, recipe.precision)
    return model
