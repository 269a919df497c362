"""Gradient accumulation over micro-batches equals one step over the whole global batch (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
from trainer_runs import SMOKE

from ascend_llm.compose import compose_recipe
from ascend_llm.train.trainer import train

# one pytest-xdist worker runs every test of the shared msrun jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("msrun_jobs")

# steps 1-5 are warmup (debug=smoke: optim.warmup_steps=5), so 5 steps have the learning rates of the shared
# 20-step reference's first 5 steps
STEPS = 5


def run(out, data_cache, *overrides) -> dict:
    return train(compose_recipe([*SMOKE, f"train.num_steps={STEPS}", f"data.cache_dir={data_cache}",
                                 "train.val_batches=0", f"train.output_dir={out}", *overrides]))


@pytest.fixture(scope="module")
def full_batch(trainer_jobs) -> list[float]:
    """The reference losses: one micro-batch per step, no recompute (the one-process `debug=smoke` run at global
    batch 8 that the msrun tests share, trainer_runs.py), its first STEPS steps."""
    summary = trainer_jobs.reference("smoke")[0]
    assert summary["losses"][0] != summary["losses"][STEPS - 1]
    return summary["losses"][:STEPS]


def test_accumulation_matches_full_batch(tmp_path, data_cache, full_batch):
    accum = run(tmp_path / "b", data_cache, "train.grad_accum_steps=4")
    np.testing.assert_allclose(accum["losses"], full_batch, rtol=0, atol=2e-5)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_changes_no_number(tmp_path, data_cache, full_batch, mode):
    recomputed = run(tmp_path / "b", data_cache, f"train.recompute={mode}")
    np.testing.assert_allclose(recomputed["losses"], full_batch, rtol=0, atol=1e-6)


def test_blended_document_masked_training_reports_its_mix(tmp_path, data_cache):
    import json

    from tests.conftest import CORPORA

    sources = []
    for name in ("tang_poems.jsonl", "song_ci.jsonl"):
        if not (CORPORA / name).is_file():
            pytest.skip(f"shared corpus absent: {CORPORA / name}")
        path = tmp_path / name
        path.write_text("".join((CORPORA / name).read_text(encoding="utf-8").splitlines(True)[:600]),
                        encoding="utf-8")
        sources.append(str(path))
    summary = train(compose_recipe(["debug=smoke", "train.num_steps=2", "train.progress=false",
                                    "train.sample_tokens=0", "train.log_every=1", "data.document_mask=true",
                                    "train.val_batches=0",
                                    f"data.sources=[0.75,{sources[0]},0.25,{sources[1]}]",
                                    f"data.cache_dir={data_cache}", f"train.output_dir={tmp_path / 'run'}"]))
    assert all(np.isfinite(summary["losses"]))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    mix = last["data_mix"]
    assert sum(v["sequences"] for v in mix.values()) == 16  # 2 steps x global batch 8
    assert mix[sources[0]]["weight"] == 0.75 and mix[sources[1]]["weight"] == 0.25
