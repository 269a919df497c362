"""Data parallel under real msrun on CPU, through the trainer, in the 2-worker job of trainer_runs.py (launched by
`ascend-llm launch cluster=cpu_2proc` with workers/train_worker.py): dp2 trains 20 steps with the same loss curve
(<= 1e-5) as 1 process with the same global batch, ends with bit-identical parameters on both ranks (each rank
logs a digest of its final parameters), and rank 0's checkpoint holds those parameters and matches the 1-process
one. FP8 dp2 with a closing sample ends cleanly on both ranks."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import FP8_STEPS, NUM_STEPS, checkpoint

from tests.conftest import read_records

# one pytest-xdist worker runs every test of the shared msrun jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("msrun_jobs")


def metric_losses(run_dir: Path) -> tuple[list[float], float]:
    """(training loss per step, validation loss at the last step)."""
    records = read_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    return [r["loss"] for r in records], records[-1]["val_loss"]


def load_model(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint(run_dir, NUM_STEPS) / "model.safetensors"))


def test_two_msrun_workers_match_one_process(trainer_jobs):
    _, one_dir, _ = trainer_jobs.reference("smoke")
    reference, reference_val = metric_losses(one_dir)
    done = trainer_jobs.job(2)
    assert "--worker_num=2 --local_worker_num=2" in done.stdout

    # Metrics come from rank 0 only, and its loss is the mean over both ranks' halves of the batch; validation
    # reads the same held-out windows as one process, each rank its half of each batch.
    two_dir = trainer_jobs.run_dir("dp2")
    losses, val = metric_losses(two_dir)
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(val, reference_val, rtol=0, atol=1e-5)
    logs = sorted(p.name for p in trainer_jobs.msrun_log_dir(2).iterdir())
    assert logs == ["scheduler.log", "worker_0.log", "worker_1.log"]
    # Every rank logs a digest of its final parameters: bit-identical replicas give equal digests.
    digests = {}
    for rank in (0, 1):
        text = trainer_jobs.log("dp2", rank)
        found = re.findall(rf"rank {rank}: final parameters sha256=([0-9a-f]{{64}})", text)
        assert len(found) == 1, text[-3000:]
        digests[rank] = found[0]
    assert digests[0] == digests[1], "parameters differ between ranks"
    one, two = load_model(one_dir), load_model(two_dir)
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-5, err_msg=f"{name} vs 1 process")
    digest = hashlib.sha256()
    for name in sorted(two):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(two[name]).tobytes())
    assert digest.hexdigest() == digests[0], "rank 0's checkpoint is not its final parameters"


def test_fp8_data_parallel_with_a_closing_sample_ends_cleanly_on_both_ranks(trainer_jobs):
    """Every forward that may hold collectives (FP8 amax reduction) runs on all ranks, the closing sample
    included: the run ends (it crashed at the sample before) and the next runs of the job go on, both ranks end
    in sync, and the losses match one FP8 process to FP8 rounding."""
    reference = trainer_jobs.reference("fp8")[0]
    done = trainer_jobs.job(2)  # workers' logs relayed to the console (cluster.tail_worker_log=all)
    assert "final parameters sha256" in done.stdout  # the workers' own log lines reach the console ...
    assert "[INFO] DISTRIBUTED" not in done.stdout  # ... MindSpore's cluster-layer INFO chatter does not
    run_dir = trainer_jobs.run_dir("fp8_dp2")
    records = read_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, FP8_STEPS + 1))
    assert not any("val_loss" in r for r in records)  # train.val_batches=0: not even at the last step
    # Each rank quantizes its own half-batch gradients to FP8 (with shared, MAX-reduced scales), so the sums
    # differ from one process's full-batch quantization by FP8 rounding: 1e-3 relative, not 1e-5.
    np.testing.assert_allclose([r["loss"] for r in records], reference["losses"], rtol=1e-3, atol=0)
    assert (run_dir / "sample.txt").read_text().startswith("def ")
    digests = [re.findall(r"final parameters sha256=([0-9a-f]{64})", trainer_jobs.log("fp8_dp2", rank))
               for rank in (0, 1)]
    assert digests[0] and digests[0] == digests[1]
