"""Integration tests (multi-process or end to end): every test in this folder is marked `integration` here, by
folder, so `pytest -m "not integration"` runs the unit tests alone and `-m integration` these.

Session fixtures shared by several files:
- `layout_jobs` (`LayoutJobs`): workers/tpcp_worker.py under msrun, one 2-worker job running every mode
  (comm.py's collectives, each TP/CP layout's forward and backward, the replicated KV head, ZeRO-1/2 against
  AdamW), for test_comm_msrun, test_tpcp_msrun, test_tpz_msrun and test_zero_msrun;
- `tpcp_data` (the corpus of short documents) and `trainer_jobs` (trainer_runs.TrainerJobs: the one-process
  references and one msrun trainer job per world size), for test_dp_msrun, test_zero_train_msrun,
  test_tpcp_train_msrun, test_tpz_msrun, test_grad_accumulation, test_moe_ep_msrun, test_preference_msrun,
  test_distill_msrun and test_contrastive_msrun (the last four add their runs to the jobs: trainer_runs.add_runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "workers"))
sys.path.insert(0, str(HERE))
from trainer_runs import TrainerJobs  # noqa: E402

from tests.conftest import run_msrun  # noqa: E402

# The tests that use `trainer_jobs` (below) set `xdist_group("msrun_jobs")`, those that use `layout_jobs`
# `xdist_group("layout_jobs")`: under `pytest -n 2 --dist loadgroup` one worker runs each group, so each msrun job
# runs once per session (and the two groups may run side by side).
# (Marks added here in pytest_collection_modifyitems come too late for xdist's grouping.)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


WORDS = ("spring river moon night wind flower mountain cloud rain snow autumn willow bird boat bridge lamp "
         "window garden stone road field forest pine bamboo lake temple bell smoke dawn dusk frost valley").split()


def write_corpus(path: Path, num_docs: int = 3000) -> None:
    """Short documents (4..14 words, seeded): a 32-token window always spans several."""
    rng = np.random.default_rng(0)
    with open(path, "w") as out:
        for _ in range(num_docs):
            words = rng.choice(WORDS, size=int(rng.integers(4, 15)))
            out.write(json.dumps({"text": " ".join(words) + "."}) + "\n")


@pytest.fixture(scope="session")
def tpcp_data(tmp_path_factory) -> list[str]:
    """Overrides of the short-document corpus (data.path, data.cache_dir)."""
    root = tmp_path_factory.mktemp("tpcp_data")
    write_corpus(root / "docs.jsonl")
    return [f"data.path={root / 'docs.jsonl'}", f"data.cache_dir={root / 'cache'}"]


@pytest.fixture(scope="session")
def trainer_jobs(tmp_path_factory, one_process, data_cache, tpcp_data) -> TrainerJobs:
    return TrainerJobs(tmp_path_factory.mktemp("trainer_jobs"), one_process, f"data.cache_dir={data_cache}",
                       tpcp_data)


# one msrun job per world size runs every mode of that size (start-up dominates a job on CPU). TP and CP composed
# with DP on 4 workers are checked through the trainer (trainer_runs.py: tp2_dp2, cp2_dp2), not here
LAYOUT_JOBS = {2: ("comm", "tp", "cp", "tp_sp", "kv1", "zero")}


class LayoutJobs:
    """workers/tpcp_worker.py's results: `self.dir(mode)` is the directory its job wrote (comm_rank<r>.npz for
    "comm"), `self[mode]` rank 0's <mode>.npz; each world size's job runs once, on first use of any of its modes."""

    def __init__(self, out: Path):
        self.out, self.done = out, {}

    def dir(self, mode: str) -> Path:
        workers = next(size for size, modes in LAYOUT_JOBS.items() if mode in modes)
        if workers not in self.done:
            self.done[workers] = False  # a failed job is not launched again by the next test
            run_msrun(HERE / "workers" / "tpcp_worker.py", self.out / str(workers), ",".join(LAYOUT_JOBS[workers]),
                      workers=workers)
            self.done[workers] = True
        if not self.done[workers]:
            raise AssertionError(f"the {workers}-worker layout job failed (see the first test that used it)")
        return self.out / str(workers)

    def __getitem__(self, mode: str) -> dict:
        return dict(np.load(self.dir(mode) / f"{mode}.npz"))


@pytest.fixture(scope="session")
def layout_jobs(tmp_path_factory) -> LayoutJobs:
    return LayoutJobs(tmp_path_factory.mktemp("layouts"))
