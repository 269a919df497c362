"""The attention backend reaches the model as a typed sub-cell whose defaults live only in AttentionConfig."""

from __future__ import annotations

from ascend_llm.attention import resolve_backend
from ascend_llm.attention.core import CoreAttention
from ascend_llm.compose import compose_recipe
from ascend_llm.config.attention import AttentionConfig
from ascend_llm.models import build_model
from ascend_llm.train.build import build_training_model


def core_cells(model):
    return [cell for _, cell in model.cells_and_names() if isinstance(cell, CoreAttention)]


def test_a_bare_model_uses_the_attention_config_defaults():
    recipe = compose_recipe(["model=debug"])
    cells = core_cells(build_model(recipe.model))
    defaults = AttentionConfig()
    assert len(cells) == recipe.model.num_layers
    assert {(c.backend, c.block_q, c.block_k) for c in cells} == {(resolve_backend(defaults.backend),
                                                                    defaults.block_q, defaults.block_k)}


def test_the_recipe_backend_and_blocks_replace_every_core_attention():
    recipe = compose_recipe(["model=debug", "attention=segmented", "attention.block_q=32", "attention.block_k=16"])
    cells = core_cells(build_training_model(recipe))
    assert len(cells) == recipe.model.num_layers
    assert {(c.backend, c.block_q, c.block_k, c.causal) for c in cells} == {("segmented", 32, 16, True)}
