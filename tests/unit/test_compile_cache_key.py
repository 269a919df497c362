"""The compile-cache directory key: reruns that change no graph share it; any change of a graph input does not."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ascend_llm.config import compose_recipe
from ascend_llm.train.runtime import compile_cache_key


def key(*overrides: str) -> str:
    return compile_cache_key(OmegaConf.to_container(OmegaConf.structured(compose_recipe(["debug=smoke", *overrides]))))


def test_reruns_that_change_no_graph_share_the_key():
    base = key("train.output_dir=/a")
    assert key("train.output_dir=/b", "train.num_steps=7", "train.resume=auto", "train.log_every=3") == base
    assert len(base) == 16 and int(base, 16) >= 0


@pytest.mark.parametrize("change", ["model.dim=96", "data.seq_len=32", "precision=bf16", "attention=naive",
                                    "train.global_batch_size=16", "runtime.mode=pynative"])
def test_a_changed_graph_input_gets_its_own_directory(change):
    assert key(change) != key()
