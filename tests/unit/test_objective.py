"""The objective seam (train/objective.py): the registry refuses unknown names in one line, and next-token
cross-entropy of a model that returns (logits, aux_loss) (Mixture-of-Experts) adds the aux loss, compared with
float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor, nn

from ascend_llm.compose import compose_recipe
from ascend_llm.config.objective import OBJECTIVES
from ascend_llm.errors import ConfigError
from ascend_llm.train.objective import LanguageModeling, build_objective
from ascend_llm.train.step import cross_entropy_loss


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, labels[..., None], -1).mean())


class TableModel(nn.Cell):
    """logits = a fixed table row per token id; optionally also returns a fixed aux loss."""

    def __init__(self, table: np.ndarray, aux: float | None):
        super().__init__()
        self.table, self.aux = Tensor(table), aux

    def construct(self, tokens, segment_ids=None):
        logits = self.table[tokens]
        return logits if self.aux is None else (logits, Tensor(np.float32(self.aux)))


@pytest.mark.parametrize("aux", [None, 0.25])
def test_language_modeling_adds_the_models_aux_loss(aux):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((11, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 5)).astype(np.int32)
    labels = rng.integers(0, 11, (2, 5)).astype(np.int32)
    objective = LanguageModeling(cross_entropy_loss, with_aux_loss=aux is not None)
    loss, extra = objective.loss(TableModel(table, aux), Tensor(tokens), Tensor(labels))
    expected = numpy_cross_entropy(table[tokens], labels) + (aux or 0.0)
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-6)
    assert objective.aux_names == (("aux_loss",) if aux is not None else ())
    assert [float(v.asnumpy()) for v in extra] == ([pytest.approx(aux)] if aux is not None else [])


def test_unknown_objective_is_refused_naming_the_field_and_the_registered_names():
    with pytest.raises(ConfigError) as info:
        compose_recipe(["model=debug", "objective.name=ppo"])
    message = str(info.value)
    assert "objective.name" in message and "ppo" in message and all(name in message for name in OBJECTIVES)


def test_every_registered_builder_imports():
    """Each registry entry names a module:function that exists (a typo would only show when a user picks it)."""
    import importlib

    for name, target in OBJECTIVES.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_default_recipe_builds_language_modeling():
    recipe = compose_recipe(["model=debug"])
    objective = build_objective(recipe, cross_entropy_loss)
    assert isinstance(objective, LanguageModeling) and objective.name == "lm" and objective.splits_sequence
