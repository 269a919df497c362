"""Replay blends for incremental training: a source of weight 0 is validated only (never drawn for training), and
each source's held-out loss gets its own metrics key."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.data import parse_sources
from ascend_llm.data.blend import BlendedDataset
from ascend_llm.data.dataset import PackedDataset
from ascend_llm.errors import ConfigError
from ascend_llm.train.val_sources import source_key


def test_weight_zero_is_accepted_and_all_zero_refused():
    assert parse_sources(["1.0", "song.jsonl", "0", "tang.jsonl"]) == [(1.0, "song.jsonl"), (0.0, "tang.jsonl")]
    with pytest.raises(ConfigError, match="at least one weight must be > 0"):
        parse_sources(["0", "song.jsonl", "0", "tang.jsonl"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\]"):
        parse_sources(["-0.5", "song.jsonl", "1", "tang.jsonl"])


def test_a_zero_weight_source_is_never_trained_on_but_keeps_its_validation_windows():
    datasets = [PackedDataset(np.arange(4000, dtype=np.int32) % 50, 16, 0.1, seed) for seed in (1, 2)]
    blend = BlendedDataset(datasets, [1.0, 0.0], seed=3, names=["song_ci.jsonl", "tang_poems.jsonl"], block=100)
    drawn = blend.train_indices(0, 500)
    assert np.all(drawn < blend.bases[1])  # every window from source 0
    assert blend.describe_mix(500)["tang_poems.jsonl"]["sequences"] == 0
    assert datasets[1].val_indices(8).size == 8  # its held-out windows exist for val_loss/tang_poems


def test_source_keys():
    assert source_key("../shared/corpora/song_ci.jsonl") == "val_loss/song_ci"
    assert source_key("data/tang_poems.jsonl.gz") == "val_loss/tang_poems"
    assert source_key("corpus_folder") == "val_loss/corpus_folder"
