"""End to end through the CLI in subprocesses: smoke training, kill-and-resume, corrupted checkpoint fallback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMON = ["debug=smoke", "train.log_every=1", "train.ckpt_every=10", "train.val_every=15",
          "train.progress=false", "train.sample_tokens=8"]


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ascend_llm.cli.main", "train", *args]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def cache(data_cache) -> str:
    return data_cache


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = subprocess.run(cli([*COMMON, f"train.output_dir={run_dir}", f"data.cache_dir={cache}"]),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_smoke_trains_and_writes_run_directory(smoke_run):
    run_dir, proc = smoke_run
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 31))
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(26, 31)) / 5
    assert last < first - 0.3, f"loss did not decrease: first five {first:.3f}, last five {last:.3f}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(records[-1])
    assert any("val_loss" in r and "val_ppl" in r for r in records)
    assert (run_dir / "checkpoints" / "step_00000030" / "model.safetensors").is_file()
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sample:" in proc.stdout and (run_dir / "sample.txt").read_text().startswith("def ")


def test_kill_and_resume_reproduces_the_uninterrupted_curve(smoke_run, cache, tmp_path):
    reference = losses(smoke_run[0])
    run_dir = tmp_path / "run"
    args = cli([*COMMON, f"train.output_dir={run_dir}", f"data.cache_dir={cache}"])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = run_dir / "checkpoints" / "step_00000020" / "state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never reached its step-20 checkpoint"

    # Corrupt the newest checkpoint: resume must report it and fall back to the previous one.
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    newest = checkpoints[-1]
    blob = bytearray((newest / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x55
    (newest / "model.safetensors").write_bytes(bytes(blob))
    fallback_step = int(checkpoints[-2].name[5:])
    # A kill while appending leaves a torn last line in metrics.jsonl: resume and the plot must not mind it.
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 99, "loss": 4.2')

    resumed = subprocess.run(cli([*COMMON, f"train.output_dir={run_dir}", f"data.cache_dir={cache}",
                                  "train.resume=auto"]), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{newest.name}" in resumed.stderr and "corrupted" in resumed.stderr
    assert f"resumed from {checkpoints[-2]} at step {fallback_step}" in resumed.stderr
    assert "Traceback" not in resumed.stderr and (run_dir / "loss.png").is_file()
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 31))
    for step in range(fallback_step + 1, 31):
        assert curve[step] == reference[step], f"step {step}: resumed {curve[step]!r} != {reference[step]!r}"


def test_resume_from_a_corrupted_explicit_checkpoint_exits_2(smoke_run, cache, tmp_path):
    source = smoke_run[0] / "checkpoints" / "step_00000030"
    broken = tmp_path / "step_00000030"
    broken.mkdir()
    for f in source.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "optimizer.safetensors").write_bytes(b"\x00" * 16)
    proc = subprocess.run(cli([*COMMON, f"train.output_dir={tmp_path}/r", f"data.cache_dir={cache}",
                               f"train.resume={broken}"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("checkpoint error")]
    assert len(line) == 1 and "optimizer.safetensors" in line[0] and "corrupted" in line[0]


def test_multirun_sweep_runs_each_job_in_its_own_directory(cache, tmp_path):
    proc = subprocess.run(cli(["--multirun", "debug=smoke", "train.num_steps=2", "optim.lr=1e-3,2e-3",
                               f"train.output_dir={tmp_path}", f"data.cache_dir={cache}", "train.progress=false",
                               "train.sample_tokens=0", "train.val_batches=0"]), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in ((0, 1e-3), (1, 2e-3)):
        run = tmp_path / "multirun" / str(job)
        assert len(losses(run)) == 2
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
