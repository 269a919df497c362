"""Data parallel under real msrun on CPU: 2 workers (`cluster=cpu_2proc parallel=dp2`) launched by
`ascend-llm launch` train 20 steps with the same loss curve (<= 1e-5) as 1 process with the same global
batch, end with bit-identical parameters on both ranks (each rank logs a digest of its final parameters),
and rank 0's checkpoint holds those parameters and matches the 1-process one."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ascend_llm.cluster.launch import find_free_port

pytestmark = pytest.mark.integration

NUM_STEPS = 20
COMMON = ["debug=smoke", f"train.num_steps={NUM_STEPS}", "train.global_batch_size=8", "train.log_every=1",
          f"train.val_every={NUM_STEPS}", f"train.ckpt_every={NUM_STEPS}", "train.progress=false",
          "train.sample_tokens=0"]



def metric_losses(run_dir: Path) -> tuple[list[float], float]:
    """(training loss per step, validation loss at the last step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    return [r["loss"] for r in records], records[-1]["val_loss"]


def checkpoint(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"step_{NUM_STEPS:08d}" / "model.safetensors"))


def test_two_msrun_workers_match_one_process(tmp_path):
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    train(compose_recipe([*COMMON, cache, f"train.output_dir={one_dir}"]))
    reference, reference_val = metric_losses(one_dir)

    overrides = [*COMMON, cache, f"train.output_dir={two_dir}", "cluster=cpu_2proc", "parallel=dp2",
                 f"cluster.master_port={find_free_port()}", "cluster.cluster_timeout_s=120",
                 "cluster.job_timeout_s=400", "cluster.tail_worker_log=none"]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "launch", *overrides],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "--worker_num=2 --local_worker_num=2" in done.stdout
    print(f"2-worker msrun job: {time.monotonic() - start:.1f} s")

    # Metrics come from rank 0 only, and its loss is the mean over both ranks' halves of the batch; validation
    # reads the same held-out windows as one process, each rank its half of each batch.
    losses, val = metric_losses(two_dir)
    np.testing.assert_allclose(losses, reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(val, reference_val, rtol=0, atol=1e-5)
    logs = sorted(p.name for p in (two_dir / "msrun_log").iterdir())
    assert logs == ["scheduler.log", "worker_0.log", "worker_1.log"]
    # Every rank logs a digest of its final parameters: bit-identical replicas give equal digests.
    digests = {}
    for rank in (0, 1):
        text = (two_dir / "msrun_log" / f"worker_{rank}.log").read_text()
        found = re.findall(rf"rank {rank}: final parameters sha256=([0-9a-f]{{64}})", text)
        assert len(found) == 1, text[-3000:]
        digests[rank] = found[0]
    assert digests[0] == digests[1], "parameters differ between ranks"
    one, two = checkpoint(one_dir), checkpoint(two_dir)
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-5, err_msg=f"{name} vs 1 process")
    digest = hashlib.sha256()
    for name in sorted(two):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(two[name]).tobytes())
    assert digest.hexdigest() == digests[0], "rank 0's checkpoint is not its final parameters"


def test_fp8_data_parallel_with_a_closing_sample_ends_cleanly_on_both_ranks(tmp_path):
    """Every forward that may hold collectives (FP8 amax reduction) runs on all ranks, the closing sample
    included: the job exits 0 (it crashed at the sample before), both ranks end in sync, and the losses match
    one FP8 process to FP8 rounding."""
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    steps = 4
    common = ["debug=smoke", "precision=fp8", f"train.num_steps={steps}", "train.global_batch_size=8",
              "train.log_every=1", "train.val_every=1000", f"train.ckpt_every={steps}", "train.progress=false",
              "train.sample_tokens=4", f"data.cache_dir={tmp_path / 'cache'}"]
    reference = train(compose_recipe([*common, f"train.output_dir={tmp_path / 'one'}"]))
    overrides = [*common, f"train.output_dir={tmp_path / 'two'}", "cluster=cpu_2proc", "parallel=dp2",
                 f"cluster.master_port={find_free_port()}", "cluster.cluster_timeout_s=120",
                 "cluster.job_timeout_s=400"]  # workers' logs relayed to the console (tail_worker_log=all)
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "launch", *overrides],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "final parameters sha256" in done.stdout  # the workers' own log lines reach the console ...
    assert "[INFO] DISTRIBUTED" not in done.stdout  # ... MindSpore's cluster-layer INFO chatter does not
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    # Each rank quantizes its own half-batch gradients to FP8 (with shared, MAX-reduced scales), so the sums
    # differ from one process's full-batch quantization by FP8 rounding: 1e-3 relative, not 1e-5.
    np.testing.assert_allclose([r["loss"] for r in records], reference["losses"], rtol=1e-3, atol=0)
    assert (tmp_path / "two" / "sample.txt").read_text().startswith("def ")
    digests = [re.findall(r"final parameters sha256=([0-9a-f]{64})",
                          (tmp_path / "two" / "msrun_log" / f"worker_{rank}.log").read_text()) for rank in (0, 1)]
    assert digests[0] and digests[0] == digests[1]
