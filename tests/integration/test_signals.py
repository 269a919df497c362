"""Signals end training runs cleanly, tried as users do on a real `ascend-llm train` subprocess.

SIGTERM mid-training and Ctrl-C (SIGINT) during the first step's compile: the step finishes, is checkpointed
(the checkpoint verifies), one line says so, the exit status is 143 / 130; `train.resume=auto` then continues and
the metrics of every step (loss, grad_norm, lr) equal an uninterrupted run's bit for bit. A second signal aborts at
once and leaves no checkpoint directory behind, torn or whole. The learning rate is constant after warmup
(optim.min_lr_ratio=1) so runs of different train.num_steps share a schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ascend_llm.train.checkpoint import list_checkpoints, read_checkpoint
from tests.conftest import raise_priority

pytestmark = pytest.mark.integration

REFERENCE_STEPS = 40  # the SIGTERM lands between steps 2 and 40 even when the test process waits ~0.5 s for a core
COMMON = ["debug=smoke", "train.progress=false", "train.log_every=1", "train.sample_tokens=0", "train.val_batches=0",
          "train.ckpt_every=1000", "optim.min_lr_ratio=1.0"]


def train_argv(run_dir: Path, cache: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "ascend_llm.cli.main", "train", *COMMON, f"data.cache_dir={cache}",
            f"train.output_dir={run_dir}", *overrides]


def curve(run_dir: Path) -> list[tuple]:
    """(step, loss, grad_norm, lr) of every metrics record, as written (floats compared exactly)."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if "loss" in r]


def wait_for(predicate, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the run ended early with {proc.returncode}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def past_step(run_dir: Path, step: int):
    """True once metrics.jsonl holds a whole record of a step after `step`."""
    metrics = run_dir / "metrics.jsonl"

    def logged() -> bool:
        text = metrics.read_text() if metrics.is_file() else ""
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        return bool(lines) and json.loads(lines[-1])["step"] > step

    return logged


def compiling(proc_log: Path):
    return lambda: proc_log.is_file() and "precision=" in proc_log.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache) -> list[tuple]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(train_argv(run_dir, data_cache, f"train.num_steps={REFERENCE_STEPS}"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return curve(run_dir)


def interrupt(run_dir: Path, cache: str, signum: int, when, *overrides: str, count: int = 1) -> tuple[int, str]:
    """Start a 200-step run, send `signum` once `when(run_dir, log)` holds (with count=2, again once the first is
    announced); returns (exit status, stderr)."""
    log = run_dir.parent / f"{run_dir.name}.stderr"
    with open(log, "w") as err:
        argv = train_argv(run_dir, cache, "train.num_steps=200", *overrides)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            wait_for(when(run_dir, log), proc)
            proc.send_signal(signum)
            if count == 2:  # once the first one is handled (announced), the second
                wait_for(lambda: "received: stopping" in log.read_text(), proc)
                proc.send_signal(signum)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, log.read_text()


def check_stopped(run_dir: Path, stderr: str, name: str) -> int:
    """The one closing line names the signal, the step reached and its checkpoint, the newest, which verifies;
    returns the step."""
    last = stderr.strip().splitlines()[-1]
    step = curve(run_dir)[-1][0]  # the last step the run logged (train.log_every=1)
    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    assert last == f"stopped by {name} at step {step}; checkpoint {checkpoint}; resume with train.resume=auto", last
    assert "Traceback" not in stderr
    assert list_checkpoints(run_dir)[0] == checkpoint
    meta, tensors = read_checkpoint(checkpoint)  # checksums verify
    assert meta["step"] == step and meta["parts"]["run"]["step"] == step and set(tensors) >= {"model", "optimizer"}
    return step


def test_ctrl_c_in_the_compile_then_sigterm_mid_training_checkpoint_the_step_reached_and_resume_bit_exactly(
        tmp_path, data_cache, reference):
    run_dir = tmp_path / "run"
    # Ctrl-C while the first step compiles: announced at once, the first step finishes and is checkpointed
    status, stderr = interrupt(run_dir, data_cache, signal.SIGINT, lambda _, log: compiling(log))
    assert status == 130, stderr[-3000:]
    assert "SIGINT received: stopping after the current step" in stderr
    assert check_stopped(run_dir, stderr, "SIGINT") == 1
    # resumed, then SIGTERM once a step past the resumed one is logged
    status, stderr = interrupt(run_dir, data_cache, signal.SIGTERM, lambda r, _: past_step(r, 1),
                               "train.resume=auto")
    assert status == 143, stderr[-3000:]
    step = check_stopped(run_dir, stderr, "SIGTERM")
    assert 1 < step < REFERENCE_STEPS
    # resumed again to the end: every step's metrics equal the uninterrupted run's
    done = subprocess.run(train_argv(run_dir, data_cache, "train.resume=auto", f"train.num_steps={REFERENCE_STEPS}"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert curve(run_dir) == reference


def test_a_second_signal_aborts_at_once_and_leaves_no_checkpoint_behind(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    status, stderr = interrupt(run_dir, data_cache, signal.SIGTERM, lambda _, log: compiling(log), count=2)
    assert status == -signal.SIGTERM, stderr[-3000:]  # killed by the default action
    assert time.monotonic() - start < 120
    checkpoints = run_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        env = child.environ()
        if env.get("MS_ROLE") == "MS_WORKER" and env.get("RANK_ID") == str(rank):
            return child.pid
    raise AssertionError(f"no worker of rank {rank} under the launcher")


def test_sigterm_to_one_rank_under_launch_stops_every_rank_after_the_same_step_with_one_checkpoint(
        tmp_path, data_cache):
    """msrun, 2 workers (data parallel): only rank 1 receives SIGTERM (as from a cluster scheduler); the ranks
    agree on the stop step (an all-reduce of their stop flags), rank 0 writes that step's checkpoint after the
    collective gather, and no rank exits before it is on disk; the launcher reports the stop and exits 143."""
    from ascend_llm.cluster.launch import find_free_port

    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "ascend_llm.cli.main", "launch", "cluster=cpu_2proc", "parallel=dp2", *COMMON,
            "train.num_steps=200", f"data.cache_dir={data_cache}", f"train.output_dir={run_dir}",
            f"cluster.master_port={find_free_port()}", "cluster.failure_grace_s=3", "cluster.tail_worker_log=0"]
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, preexec_fn=raise_priority)
        try:
            wait_for(past_step(run_dir, 0), proc)
            os.kill(worker_pid(proc, 1), signal.SIGTERM)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("launch stopped by SIGTERM after"), stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    step = curve(run_dir)[-1][0]
    checkpoint = run_dir / "checkpoints" / f"step_{step:08d}"
    assert list_checkpoints(run_dir) == [checkpoint]
    assert read_checkpoint(checkpoint)[0]["step"] == step
    logs = [(run_dir / "msrun_log" / f"worker_{rank}.log").read_text() for rank in (0, 1)]
    assert "SIGTERM received" not in logs[0] and "SIGTERM received: stopping after the current step" in logs[1]
    assert f"stopped by SIGTERM at step {step}; checkpoint {checkpoint}; resume with train.resume=auto" in logs[0]
    leftovers = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.strip()
    assert not leftovers, leftovers
