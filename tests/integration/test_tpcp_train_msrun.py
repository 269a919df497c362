"""Tensor and context parallel through the trainer, under real msrun on CPU (MCCL), fp32, 20 steps.

The layouts `tp2_dp2` and `cp2_dp2` (4 workers) train the debug model for 20 steps on the same global batch as one
process, each a run of trainer_runs.py's 4-worker msrun job (`ascend-llm launch` with workers/train_worker.py):
each TP (CP) pair of ranks runs exactly what a tp2 (cp2) job would, and reduces over DP besides, so these runs
carry every assertion a 2-worker tp2 or cp2 run would. TP and CP at dp=1 train through the trainer in the 2-worker
job too (test_tpz_msrun's cp2_zero2, test_preference_msrun's dpo_tp2 and dpo_cp2). The corpus is written by the
`tpcp_data` fixture: thousands of short documents, so every packed window holds several of them; the
context-parallel run trains with `data.document_mask=true` (attention and labels stay inside each document, across
CP shards, and the loss is the token mean of the whole global batch though the replicas count different numbers of
tokens: averaging the replicas' own means was 2.5e-4 off one process at step 1).
The reference is the one-process run of the same recipe, computed by the trainer itself in this test's process
(a different code path: no groups, plain cross-entropy, plain clipping), once per configuration (session
fixtures shared by every test):

- per-step losses, gradient norms and the final validation loss equal it within 1e-5 absolute (fp32: the
  parallel runs sum the same terms in another order, so the last bits differ; 1e-5 is the issue's bound);
- the closing greedy/top-k sample (every rank runs it; TP/CP logits are gathered) is the same text;
- the checkpoint is layout-free: the same names and full shapes as one process's, model and AdamW moments within
  PARAM_ATOL after 20 steps;
- each rank logs its final-parameter digest with its coordinates (TP ranks hold different shards, CP and DP
  ranks identical replicas);
- cross-layout resume: the tp2_dp2 run's step-18 checkpoint resumed in one process continues with the
  uninterrupted one-process losses for steps 19..20 (within 1e-5) and ends at its final parameters (one process ->
  cp2: test_tpz_msrun's cp2_zero2).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import NUM_STEPS, TPCP_RESUME, checkpoint

from tests.conftest import read_records

# one pytest-xdist worker runs every test of the shared msrun jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("msrun_jobs")

ATOL = 1e-5
# Parameters after 20 AdamW steps: Adam divides by sqrt(v), so a last-bit gradient difference in an element with
# a tiny second moment moves it by up to ~lr * (its relative error); optim.lr=1e-3 keeps that within the bound.
PARAM_ATOL = 1e-5


@pytest.fixture(scope="module")
def plain(trainer_jobs):
    """The one-process run without document masking: (summary, run dir, overrides)."""
    return trainer_jobs.reference("plain")


@pytest.fixture(scope="module")
def masked(trainer_jobs, plain):
    """The one-process run with data.document_mask=true: (summary, run dir, overrides)."""
    summary = trainer_jobs.reference("masked")
    # the windows really hold several documents: masking changes the loss curve
    assert np.abs(np.subtract(summary[0]["losses"], plain[0]["losses"])).max() > 1e-2
    return summary


def records(run_dir: Path, first: int = 1) -> list[dict]:
    out = read_records(run_dir)
    assert [r["step"] for r in out] == list(range(first, NUM_STEPS + 1))
    return out


def load(run_dir: Path, part: str, step: int = NUM_STEPS) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(checkpoint(run_dir, step) / f"{part}.safetensors"))


def check_checkpoint(run_dir: Path, one_dir: Path) -> None:
    """Same names, full shapes and dtypes as one process's final checkpoint; values within PARAM_ATOL."""
    for part in ("model", "optimizer"):
        mine, one = load(run_dir, part), load(one_dir, part)
        assert mine.keys() == one.keys() and len(one) > 2, part
        for name in one:
            assert mine[name].shape == one[name].shape and mine[name].dtype == one[name].dtype, name
            np.testing.assert_allclose(mine[name], one[name], rtol=0, atol=PARAM_ATOL, err_msg=f"{part}:{name}")


def check_against_reference(jobs, run: str, reference, workers: int, first: int = 1) -> dict[int, tuple]:
    """Losses, norms, validation, sample and checkpoint of the msrun run `run` vs one process; returns
    {rank: (digest, coordinates)} from each rank's log."""
    summary, one_dir, _ = reference
    run_dir = jobs.run_dir(run)
    got, want = records(run_dir, first), records(one_dir)[first - 1:]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=0, atol=ATOL, err_msg=key)
    np.testing.assert_allclose(got[-1]["val_loss"], want[-1]["val_loss"], rtol=0, atol=ATOL)
    assert (run_dir / "sample.txt").read_text() == summary["sample"]
    check_checkpoint(run_dir, one_dir)
    digests = {}
    for rank in range(workers):
        text = jobs.log(run, rank)
        found = re.findall(rf"rank {rank}: final parameters sha256=([0-9a-f]{{64}}) \((dp=\d cp=\d tp=\d)\)", text)
        assert len(found) == 1, text[-3000:]
        digests[rank] = found[0]
    return digests


def test_tp2_dp2_trains_like_one_process_and_its_checkpoint_resumes_in_one_process(trainer_jobs, one_process,
                                                                                    plain):
    summary, one_dir, overrides = plain
    digests = check_against_reference(trainer_jobs, "tp2_dp2", plain, 4)
    assert [digests[r][1] for r in range(4)] == [f"dp={r // 2} cp=0 tp={r % 2}" for r in range(4)]
    assert digests[0][0] == digests[2][0] != digests[1][0] == digests[3][0]  # DP replicas of each TP shard

    start = checkpoint(trainer_jobs.run_dir("tp2_dp2"), TPCP_RESUME)
    resumed, resumed_dir = one_process([*overrides, f"train.resume={start}"])
    assert resumed["start_step"] == TPCP_RESUME and len(resumed["losses"]) == NUM_STEPS - TPCP_RESUME
    np.testing.assert_allclose(resumed["losses"], summary["losses"][TPCP_RESUME:], rtol=0, atol=ATOL)
    check_checkpoint(resumed_dir, one_dir)


def test_cp2_dp2_with_document_mask_trains_like_one_process(trainer_jobs, masked):
    digests = check_against_reference(trainer_jobs, "cp2_dp2", masked, 4)
    assert [digests[r][1] for r in range(4)] == [f"dp={r // 2} cp={r % 2} tp=0" for r in range(4)]
    assert len({digests[r][0] for r in range(4)}) == 1  # every rank holds the full replica
