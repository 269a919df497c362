"""runtime.compile_cache=true: the first run fills its cache directory, a rerun of the same recipe reads it and
trains exactly the same losses as a run without the cache; another recipe gets another directory."""

from __future__ import annotations

import pytest

from ascend_llm.config import compose_recipe
from ascend_llm.train.trainer import train

pytestmark = pytest.mark.integration


def test_cached_reruns_train_the_same_losses(tmp_path, data_cache, monkeypatch):
    monkeypatch.delenv("MS_COMPILER_CACHE_ENABLE", raising=False)
    monkeypatch.delenv("MS_COMPILER_CACHE_PATH", raising=False)
    common = ["debug=smoke", "train.num_steps=3", "train.progress=false", "train.sample_tokens=0",
              "train.log_every=1", f"data.cache_dir={data_cache}"]
    cache = [f"runtime.compile_cache_dir={tmp_path / 'cache'}", "runtime.compile_cache=true"]
    plain = train(compose_recipe([*common, f"train.output_dir={tmp_path / 'plain'}"]))["losses"]
    first = train(compose_recipe([*common, *cache, f"train.output_dir={tmp_path / 'first'}"]))["losses"]
    dirs = list((tmp_path / "cache").iterdir())
    assert len(dirs) == 1 and any(p.is_file() for p in dirs[0].rglob("*"))  # the compiled graphs were written
    again = train(compose_recipe([*common, *cache, f"train.output_dir={tmp_path / 'again'}"]))["losses"]
    assert first == plain and again == plain
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the rerun used the same directory
