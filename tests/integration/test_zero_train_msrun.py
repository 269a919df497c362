"""ZeRO-2 through the trainer under real msrun (2 CPU workers, the 2-worker job of trainer_runs.py): the loss
curve of one process on the same global batch, a layout-free checkpoint (the unsharded AdamW's names and shapes),
and a cross-layout resume: the sharded run's checkpoint continues in one process exactly as the one-process run
does."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from trainer_runs import SMOKE, checkpoint

from tests.conftest import read_records

# one pytest-xdist worker runs every test of the shared msrun jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("msrun_jobs")


def test_zero2_matches_one_process_and_its_checkpoint_resumes_in_one_process(trainer_jobs, one_process, data_cache):
    # the reference runs 20 steps; steps 1-4 are warmup steps (their learning rate is that of a 4-step run)
    _, one_dir, _ = trainer_jobs.reference("smoke")
    reference = [r["loss"] for r in read_records(one_dir)]
    zero_dir = trainer_jobs.run_dir("dp2_zero2")
    np.testing.assert_allclose([r["loss"] for r in read_records(zero_dir)], reference[:4], rtol=0, atol=1e-5)

    one = load_file(str(checkpoint(one_dir, 2) / "optimizer.safetensors"))
    zero = load_file(str(checkpoint(zero_dir, 2) / "optimizer.safetensors"))
    assert one.keys() == zero.keys()
    for name in one:
        assert one[name].shape == zero[name].shape, name
        np.testing.assert_allclose(zero[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)

    resumed = one_process([*SMOKE, f"data.cache_dir={data_cache}", "train.num_steps=4", "train.val_batches=0",
                           "train.ckpt_every=2", f"train.resume={checkpoint(zero_dir, 2)}"])[0]
    np.testing.assert_allclose(resumed["losses"], reference[2:4], rtol=0, atol=1e-5)
