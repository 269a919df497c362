"""Resume through the real trainer: a changed global batch continues at the saved data position; other data,
tokenizer or a used output directory are refused; precision state (fp16 loss scale, FP8 controller) resumes
bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.data.dataset import PackedDataset
from ascend_llm.errors import CheckpointError, ConfigError
from ascend_llm.train.trainer import train

COMMON = ["debug=smoke", "data.seq_len=32", "train.progress=false", "train.sample_tokens=0", "train.log_every=1",
          "train.val_batches=0", "train.ckpt_every=2"]


def run(tmp, cache, *overrides):
    return train(compose_recipe([*COMMON, f"data.cache_dir={cache}", f"train.output_dir={tmp}", *overrides]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """Four uninterrupted steps at global batch 8, recording the windows each step reads."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    windows = []
    original = PackedDataset.train_indices

    def spy(self, position, count):
        out = original(self, position, count)
        windows.append(out.copy())
        return out

    PackedDataset.train_indices = spy
    try:
        summary = run(run_dir, data_cache, "train.num_steps=4", "train.global_batch_size=8")
    finally:
        PackedDataset.train_indices = original
    return run_dir, summary, windows


def test_resume_with_another_global_batch_reads_the_windows_an_uninterrupted_run_would(reference, data_cache,
                                                                                      tmp_path, monkeypatch):
    run_dir, _, windows = reference
    resumed_windows = []
    original = PackedDataset.train_indices
    monkeypatch.setattr(PackedDataset, "train_indices",
                        lambda self, p, c: resumed_windows.append(original(self, p, c)) or resumed_windows[-1])
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    run(tmp_path / "b", data_cache, "train.num_steps=3", "train.global_batch_size=16", f"train.resume={checkpoint}")
    assert len(resumed_windows) == 1 and len(resumed_windows[0]) == 16
    np.testing.assert_array_equal(resumed_windows[0], np.concatenate(windows[2:4]))
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["parts"]["data"]["position"] == 2 * 8 + 16


@pytest.mark.parametrize("override,field", [
    ("data.seq_len=16", "data.seq_len"),
    ("data.seed=99", "data.seed"),
])
def test_resume_on_other_data_is_refused(reference, data_cache, override, field):
    with pytest.raises(CheckpointError) as info:
        run(reference[0], data_cache, "train.num_steps=6", "train.resume=auto", override)
    assert field in info.value.field


def test_resume_on_another_corpus_names_the_tokenizer_and_how_to_reuse_it(reference, data_cache, tmp_path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text("\n".join(f"moon river spring wind {i} cloud bird flower" for i in range(3000)))
    with pytest.raises(CheckpointError) as info:
        run(reference[0], data_cache, "train.num_steps=6", "train.resume=auto", f"data.path={corpus}")
    assert info.value.field.endswith("data.tokenizer")
    assert "data.tokenizer=" in str(info.value) and "tokenizer.json" in str(info.value)


def test_a_fresh_run_in_a_used_output_directory_is_refused_and_writes_nothing(reference, data_cache):
    run_dir = reference[0]
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(ConfigError) as info:
        run(run_dir, data_cache, "train.num_steps=2")
    assert info.value.field == "train.output_dir" and "step_00000004" in str(info.value)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


@pytest.mark.parametrize("precision", ["fp16", "fp8_dynamic"])
def test_precision_state_resumes_bit_for_bit(tmp_path, data_cache, precision):
    full = run(tmp_path / "full", data_cache, "train.num_steps=6", f"precision={precision}")
    part = tmp_path / "part"  # the same run as if killed after its step-2 checkpoint
    shutil.copytree(tmp_path / "full", part)
    for step in (4, 6):
        shutil.rmtree(part / "checkpoints" / f"step_{step:08d}")
    resumed = run(part, data_cache, "train.num_steps=6", f"precision={precision}", "train.resume=auto")
    assert resumed["start_step"] == 2
    assert resumed["losses"] == full["losses"][2:]
    records = {r["step"]: r for r in map(json.loads, (part / "metrics.jsonl").read_text().splitlines())}
    reference = {r["step"]: r for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())}
    keys = [k for k in reference[6] if k.startswith(("loss_scale", "fp8/"))]
    assert keys, "the precision runtime reported no metrics"
    for key in keys:
        assert records[6][key] == reference[6][key], key
