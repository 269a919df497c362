"""Distillation under real msrun (2 CPU workers, runs of the trainer's 2-worker msrun job, trainer_runs.py): a
debug-size student learns from a frozen teacher (the llama_gqa fixture, opened by the model opener, running in the
same compiled step) under data parallel with gradient accumulation (2 micro-batches per rank: the distillation step
runs twice per update and its gradients accumulate, which a run without accumulation takes once); the loss, its CE
and KD parts per step and at validation equal the same recipe in one process within 1e-5, and the checkpoint holds
the student only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import add_runs

from tests.conftest import read_records

# one pytest-xdist worker runs every test of the shared msrun jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("msrun_jobs")

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), Path("shared/fixtures/hf"))
TEACHER = FIXTURES / "llama_gqa"  # vocab 640, EOS <|end_of_text|>
STEPS = 4
POEM = ("春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。"
        "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。紅豆生南國，春來發幾枝。願君多采擷，此物最相思。")


def _common(data: Path, cache: Path) -> list[str]:
    return ["model=debug", "model.vocab_size=640", f"data.path={data}", f"data.tokenizer={TEACHER / 'tokenizer.json'}",
            "data.eos_token='<|end_of_text|>'", "data.seq_len=32", f"data.cache_dir={cache}", "data.val_fraction=0.2",
            "objective=distill", f"objective.distill.teacher={TEACHER}", "objective.distill.kd_ratio=0.6",
            "objective.distill.temperature=2.0", "objective.distill.chunk_tokens=24", "train.global_batch_size=4",
            f"train.num_steps={STEPS}", "train.log_every=1", f"train.val_every={STEPS}", "train.val_batches=1",
            f"train.ckpt_every={STEPS}", "train.progress=false", "train.sample_tokens=0", "optim.lr=3e-3",
            "optim.warmup_steps=0"]


def _data(jobs) -> Path:
    """The session's folder for this file, with poems.jsonl (written once)."""
    root = jobs.data_dir("distill")
    data = root / "poems.jsonl"
    if not data.is_file():
        data.write_text("".join(json.dumps({"text": POEM[i:] + POEM[:i]}, ensure_ascii=False) + "\n"
                                for i in range(0, len(POEM), 4)), encoding="utf-8")
    return root


RUNS = {"kd_dp2_accum": ["parallel=dp2", "train.grad_accum_steps=2"]}
if TEACHER.is_dir():  # the runs join the trainer's 2-worker msrun job (tests/integration/trainer_runs.py)
    add_runs(2, tuple(RUNS), lambda jobs: {
        name: [*_common(_data(jobs) / "poems.jsonl", _data(jobs) / "cache_msrun"), *extra]
        for name, extra in RUNS.items()})


@pytest.mark.skipif(not TEACHER.is_dir(), reason="shared fixtures absent: ../shared/fixtures/hf")
def test_distillation_under_msrun_equals_one_process(trainer_jobs, one_process):
    root = _data(trainer_jobs)
    data, runs = root / "poems.jsonl", RUNS
    one_dir = None
    for name, extra in runs.items():
        summary, one_dir = one_process([*_common(data, root / "cache_one"),
                                        *[o for o in extra if not o.startswith("parallel=")]])
        reference, ours = read_records(one_dir), read_records(trainer_jobs.run_dir(name))
        assert [r["step"] for r in ours] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
        for mine, theirs in zip(ours, reference):
            for key in ("loss", "ce", "kd", "grad_norm", "val_loss", "val_ce", "val_kd"):
                if key in theirs:
                    np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=f"{name} {key}")
        assert {"val_ce", "val_kd"} <= set(ours[-1]) and ours[0]["kd"] > 0
        # the loss is the documented mix of its parts
        for r in ours:
            assert r["loss"] == pytest.approx(0.4 * r["ce"] + 0.6 * r["kd"], rel=1e-5)
    # the checkpoint holds the student only (debug size), under the model's own parameter names
    from ascend_llm.interop.source import open_model

    student = open_model(trainer_jobs.run_dir("kd_dp2_accum"))
    assert student.config.dim == 64 and student.config.vocab_size == 640
    assert all(not name.startswith("teacher.") for name in student.weights)
