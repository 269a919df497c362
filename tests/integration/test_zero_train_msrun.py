"""ZeRO-2 through the trainer under real msrun (2 CPU workers): the loss curve of one process on the same
global batch, a layout-free checkpoint (the unsharded AdamW's names and shapes), and a cross-layout resume: the
sharded run's checkpoint continues in one process exactly as the one-process run does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ascend_llm.cluster.launch import find_free_port

pytestmark = pytest.mark.integration

COMMON = ["debug=smoke", "train.num_steps=4", "train.global_batch_size=8", "train.log_every=1",
          "train.val_every=1000", "train.ckpt_every=2", "train.progress=false", "train.sample_tokens=0"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_zero2_matches_one_process_and_its_checkpoint_resumes_in_one_process(tmp_path):
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.trainer import train

    cache = f"data.cache_dir={tmp_path / 'cache'}"
    reference = train(compose_recipe([*COMMON, cache, f"train.output_dir={tmp_path / 'one'}"]))["losses"]
    overrides = [*COMMON, cache, f"train.output_dir={tmp_path / 'zero'}", "cluster=cpu_2proc",
                 "parallel=dp2_zero2", f"cluster.master_port={find_free_port()}", "cluster.cluster_timeout_s=120",
                 "cluster.job_timeout_s=400", "cluster.tail_worker_log=none"]
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "launch", *overrides],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    np.testing.assert_allclose(losses(tmp_path / "zero"), reference, rtol=0, atol=1e-5)

    one = load_file(str(tmp_path / "one" / "checkpoints" / "step_00000002" / "optimizer.safetensors"))
    zero = load_file(str(tmp_path / "zero" / "checkpoints" / "step_00000002" / "optimizer.safetensors"))
    assert one.keys() == zero.keys()
    for name in one:
        assert one[name].shape == zero[name].shape, name
        np.testing.assert_allclose(zero[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)

    checkpoint = tmp_path / "zero" / "checkpoints" / "step_00000002"
    resumed = train(compose_recipe([*COMMON, cache, f"train.output_dir={tmp_path / 'resumed'}",
                                    f"train.resume={checkpoint}"]))
    np.testing.assert_allclose(resumed["losses"], reference[2:], rtol=0, atol=1e-5)
