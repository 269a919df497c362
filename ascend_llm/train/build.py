"""Build the model and apply the converters in one fixed order: attention, precision, FP8, parallel.

This is the only place that combines model code with precision/parallel strategies (cf. torchtitan's
parallelize.py). Each step receives only its own sub-config.
"""

from __future__ import annotations

from mindspore import nn

from ascend_llm.attention.apply import apply_attention
from ascend_llm.config.root import RecipeConfig
from ascend_llm.models import build_model


def build_training_model(recipe: RecipeConfig) -> nn.Cell:
    model = build_model(recipe.model, seed=recipe.train.seed)
    apply_attention(model, recipe.attention)
    return model
