"""Tensor and context parallel through the trainer, under real msrun on CPU (MCCL), fp32.

`ascend-llm launch cluster=cpu_2proc parallel=tp2` (and `parallel=cp2`) trains `debug=smoke` for 4 steps on
the same global batch as one process; the reference is that one-process run, computed by the trainer
itself in this test's process (a different code path: no groups, plain cross-entropy, plain clipping):

- per-step losses, gradient norms and the step-4 validation loss equal it within 1e-5 absolute (fp32: the
  TP/CP runs sum the same terms in another order, so the last bits differ; 1e-5 is the issue's bound);
- the closing greedy/top-k sample (every rank runs it; TP/CP logits are gathered) is the same text;
- the checkpoint is layout-free: the same names and full shapes as one process's, values within 1e-4
  (model and AdamW moments);
- each rank logs its final-parameter digest with its coordinates (TP ranks hold different shards, CP ranks
  identical replicas);
- cross-layout resume: the tp2 run's step-2 checkpoint, resumed in one process, continues with the
  uninterrupted one-process run's losses for steps 3 and 4 (within 1e-5).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ascend_llm.cluster.launch import find_free_port

pytestmark = pytest.mark.integration

NUM_STEPS = 4
COMMON = ["debug=smoke", f"train.num_steps={NUM_STEPS}", "train.global_batch_size=8", "train.log_every=1",
          f"train.val_every={NUM_STEPS}", "train.ckpt_every=2", "train.progress=false", "train.sample_tokens=4"]
ATOL = 1e-5
# Parameters after 4 AdamW steps: Adam divides by sqrt(v), so a last-bit gradient difference in an element with
# a tiny second moment moves it by up to ~lr * 1e-2; measured worst 1.9e-5 at lr 3e-3 (one element of 11,264).
PARAM_ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process run: (summary, run dir, data cache override)."""
    from ascend_llm.config import compose_recipe
    from ascend_llm.train.trainer import train

    root = tmp_path_factory.mktemp("tpcp_train")
    cache = f"data.cache_dir={root / 'cache'}"
    summary = train(compose_recipe([*COMMON, cache, f"train.output_dir={root / 'one'}"]))
    assert len(summary["losses"]) == NUM_STEPS
    return summary, root / "one", cache


def records(run_dir: Path) -> list[dict]:
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in out] == list(range(1, NUM_STEPS + 1))
    return out


def launch(run_dir: Path, cache: str, layout: str) -> None:
    overrides = [*COMMON, cache, f"train.output_dir={run_dir}", "cluster=cpu_2proc", f"parallel={layout}",
                 f"cluster.master_port={find_free_port()}", "cluster.cluster_timeout_s=120",
                 "cluster.job_timeout_s=500", "cluster.tail_worker_log=none"]
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "launch", *overrides],
                          capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-3000:] for p in sorted((run_dir / "msrun_log").glob("worker_*.log")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + logs


def load(run_dir: Path, part: str, step: int = NUM_STEPS) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / f"{part}.safetensors"))


def check_against_reference(run_dir: Path, reference) -> dict[int, str]:
    """Losses, norms, validation, sample and checkpoint vs one process; returns {rank: logged digest}."""
    summary, one_dir, _ = reference
    got, want = records(run_dir), records(one_dir)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=0, atol=ATOL, err_msg=key)
    np.testing.assert_allclose(got[-1]["val_loss"], want[-1]["val_loss"], rtol=0, atol=ATOL)
    assert (run_dir / "sample.txt").read_text() == summary["sample"]
    for part in ("model", "optimizer"):
        mine, one = load(run_dir, part), load(one_dir, part)
        assert mine.keys() == one.keys() and len(one) > 2, part
        for name in one:
            assert mine[name].shape == one[name].shape and mine[name].dtype == one[name].dtype, name
            np.testing.assert_allclose(mine[name], one[name], rtol=0, atol=PARAM_ATOL, err_msg=f"{part}:{name}")
    digests = {}
    for rank in (0, 1):
        text = (run_dir / "msrun_log" / f"worker_{rank}.log").read_text()
        found = re.findall(rf"rank {rank}: final parameters sha256=([0-9a-f]{{64}}) \((dp=\d cp=\d tp=\d)\)", text)
        assert len(found) == 1, text[-3000:]
        digests[rank] = found[0]
    return digests


def test_tp2_trains_like_one_process_and_its_checkpoint_resumes_in_one_process(tmp_path, reference):
    from ascend_llm.config import compose_recipe
    from ascend_llm.train.trainer import train

    summary, _, cache = reference
    launch(tmp_path / "tp2", cache, "tp2")
    digests = check_against_reference(tmp_path / "tp2", reference)
    assert digests[0][1] == "dp=0 cp=0 tp=0" and digests[1][1] == "dp=0 cp=0 tp=1"
    assert digests[0][0] != digests[1][0]  # each TP rank holds its own shards

    resumed = train(compose_recipe([*COMMON, cache, f"train.output_dir={tmp_path / 'resumed'}",
                                    f"train.resume={tmp_path / 'tp2' / 'checkpoints' / 'step_00000002'}"]))
    assert resumed["start_step"] == 2
    np.testing.assert_allclose(resumed["losses"], summary["losses"][2:], rtol=0, atol=ATOL)


def test_cp2_trains_like_one_process(tmp_path, reference):
    launch(tmp_path / "cp2", reference[2], "cp2")
    digests = check_against_reference(tmp_path / "cp2", reference)
    assert digests[0][1] == "dp=0 cp=0 tp=0" and digests[1][1] == "dp=0 cp=1 tp=0"
    assert digests[0][0] == digests[1][0]  # CP ranks are replicas
