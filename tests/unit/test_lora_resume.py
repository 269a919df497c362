"""Resuming a LoRA fine-tune (model.pretrained = the qwen2_tied fixture) refuses any change of what the saved
adapters mean (case 12): lora.targets, lora.rank, lora.alpha, lora.enabled, one line naming the field with the
checkpoint's and the new value, exit 2, nothing written. The same recipe resumes bit-exactly (the reference is the
uninterrupted run's losses); lora.dropout, lora.seed and the order of lora.targets do not change the adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ascend_llm.cli.main import main
from ascend_llm.errors import CheckpointError
from ascend_llm.train.checkpoint import check_lora_compatible

pytestmark = pytest.mark.xdist_group("lora_resume")  # one xdist worker: module fixtures build once

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), Path("shared/fixtures/hf"))
QWEN2 = FIXTURES / "qwen2_tied"

LORA = dict(enabled=True, rank=4, alpha=8.0, dropout=0.0, targets=["wq", "wv", "w2"], seed=0)


def recipe(lora=None, seed=0, pretrained="/fixtures/qwen2_tied") -> dict:
    return {"model": {"pretrained": pretrained}, "train": {"seed": seed}, "lora": dict(LORA, **(lora or {}))}


@pytest.mark.parametrize("change,field,old,new", [
    ({"targets": ["wq", "wv"]}, "lora.targets", "['w2', 'wq', 'wv']", "['wq', 'wv']"),
    ({"rank": 8}, "lora.rank", "4", "8"),
    ({"alpha": 32.0}, "lora.alpha", "8.0", "32.0"),
    ({"enabled": False}, "lora.enabled", "True", "False"),
])
def test_a_change_of_what_the_adapters_mean_names_the_field_and_both_values(change, field, old, new):
    with pytest.raises(CheckpointError) as info:
        check_lora_compatible(recipe(), recipe(change), "run/checkpoints/step_00000003")
    line = info.value.one_line()
    assert line.startswith(f"checkpoint error: run/checkpoints/step_00000003: {field}={old}: "), line
    assert f"this run has {new}" in line


def test_lora_added_to_a_full_run_is_refused():
    with pytest.raises(CheckpointError, match="lora.enabled=False"):
        check_lora_compatible({"lora": {"enabled": False}}, recipe(), "ckpt")
    with pytest.raises(CheckpointError, match="lora.enabled=False"):
        check_lora_compatible({"model": {}}, recipe(), "ckpt")  # a recipe written before the lora group


@pytest.mark.parametrize("change", [{"dropout": 0.1}, {"seed": 7}, {"targets": ["w2", "wv", "wq"]}])
def test_what_does_not_change_the_adapters_resumes(change):
    check_lora_compatible(recipe(), recipe(change), "ckpt")
    check_lora_compatible(recipe({"enabled": False}), recipe({"enabled": False, "rank": 2}), "ckpt")


def test_without_pretrained_weights_the_seed_draws_the_base_and_must_match():
    check_lora_compatible(recipe(seed=1), recipe(seed=2), "ckpt")  # pretrained: the base comes from the files
    with pytest.raises(CheckpointError) as info:
        check_lora_compatible(recipe(seed=1, pretrained=None), recipe(seed=2, pretrained=None), "ckpt")
    assert "train.seed=1" in info.value.one_line() and "this run has 2" in info.value.one_line()


# --- through the CLI, on the real trainer ---------------------------------------------------------------------

def _chats(path: Path) -> Path:
    rng = np.random.default_rng(0)
    chars = "春江潮水連海平明月共生灩隨波千萬里何處無光流宛轉遶芳甸花林皆似霰空裏霜飛不覺汀上白沙看見"
    lines = []
    for i in range(80):
        poem = "".join(rng.choice(list(chars), 24))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"写一首诗：第{i}首"},
                                              {"role": "assistant", "content": poem}]}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _overrides(data: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", f"model.pretrained={QWEN2}", "data.format=sft", "data.document_mask=true", f"data.path={data}",
            "data.seq_len=64", f"data.cache_dir={cache}", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
            "lora.targets=[wq,wv,w2]", "optim.lr=1e-2", "optim.warmup_steps=1", "train.global_batch_size=4",
            "train.val_batches=0", "train.log_every=1", "train.progress=false", "train.sample_tokens=0",
            "train.num_steps=6", "train.ckpt_every=3", f"train.output_dir={run_dir}", *extra]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Six uninterrupted LoRA steps (adapters on wq, wv, w2; rank 4, alpha 8), checkpoints at steps 3 and 6."""
    if not QWEN2.is_dir():
        pytest.skip(f"shared fixtures absent: {QWEN2}")
    root = tmp_path_factory.mktemp("lora")
    data, cache, run_dir = _chats(root / "chats.jsonl"), root / "cache", root / "run"
    assert main(_overrides(data, cache, run_dir)) == 0
    return data, cache, run_dir


def _from_step_3(lora_run, tmp_path: Path) -> Path:
    copy = tmp_path / "res"
    shutil.copytree(lora_run[2], copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    return copy


@pytest.mark.parametrize("override,field,old,new", [
    ("lora.targets=[wq,wv]", "lora.targets", "['w2', 'wq', 'wv']", "['wq', 'wv']"),
    ("lora.rank=8", "lora.rank", "4", "8"),
    ("lora.alpha=32", "lora.alpha", "8.0", "32.0"),
    ("lora.enabled=false", "lora.enabled", "True", "False"),
])
def test_resume_with_another_lora_recipe_is_refused_in_one_line_and_writes_nothing(lora_run, tmp_path, capsys,
                                                                                   override, field, old, new):
    data, cache, _ = lora_run
    res = _from_step_3(lora_run, tmp_path)
    before = _tree(res)
    capsys.readouterr()
    assert main(_overrides(data, cache, res, "train.resume=auto", override)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("checkpoint error: "), lines
    assert f"{field}={old}: " in lines[0] and f"this run has {new}" in lines[0], lines[0]
    assert _tree(res) == before


def test_resume_with_the_same_lora_recipe_is_bit_exact(lora_run, tmp_path):
    data, cache, run_dir = lora_run
    res = _from_step_3(lora_run, tmp_path)
    assert main(_overrides(data, cache, res, "train.resume=auto", "lora.dropout=0.0", "lora.seed=5",
                           "lora.targets=[w2,wq,wv]")) == 0
    assert _losses(res) == _losses(run_dir)  # the float values of every step, 1..6, compared exactly
