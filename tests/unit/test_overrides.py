"""Overrides as users type them: non-ASCII values, misspelt group options, sweeps validated up front."""

from __future__ import annotations

import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.compose.overrides import expand_sweep, quote_overrides
from ascend_llm.errors import ConfigError


@pytest.mark.parametrize("value", ["经济", "春眠不觉晓 处处闻啼鸟", "it's 中文", "trailing\\", "Ünïcödé"])
def test_non_ascii_values_reach_the_recipe_unchanged(value):
    recipe = compose_recipe([f"train.sample_prompt={value}"])
    assert recipe.train.sample_prompt == value


def test_already_quoted_and_ascii_values_are_left_alone():
    assert quote_overrides(["a='经济'", "b=plain", "c=[1,2]", "flag"]) == ["a='经济'", "b=plain", "c=[1,2]", "flag"]


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        compose_recipe(["precision=fp9"])
    assert info.value.field == "precision" and info.value.value == "fp9"
    assert "allowed: " in str(info.value) and "fp8" in str(info.value) and "bf16" in str(info.value)


def test_sweep_expands_every_combination_with_non_ascii_values():
    combos = expand_sweep(quote_overrides(["optim.lr=1e-3,3e-3", "train.sample_prompt=经济,中国", "model=debug"],
                                          sweep=True))
    assert len(combos) == 4
    prompts = {compose_recipe(c).train.sample_prompt for c in combos}
    assert prompts == {"经济", "中国"}
    assert {compose_recipe(c).optim.lr for c in combos} == {1e-3, 3e-3}


def test_unquoted_comma_or_space_says_to_quote_and_the_quoted_value_works():
    with pytest.raises(ConfigError, match=r"quote a value that holds spaces, commas") as err:
        compose_recipe(["train.sample_prompt=import os, sys"])
    assert "\n" not in err.value.one_line()
    assert compose_recipe(["train.sample_prompt='import os, sys'"]).train.sample_prompt == "import os, sys"


def test_unquoted_newline_says_to_quote():
    with pytest.raises(ConfigError, match=r"quote a value that holds spaces, commas"):
        compose_recipe(["train.sample_prompt=import os\ndef main(): return 0"])
