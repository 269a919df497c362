"""The trainer under msrun, one job per world size: the recipes the msrun trainer tests compare, and the jobs.

`TrainerJobs` launches `workers/train_worker.py` once per world size (`ascend-llm launch cluster=cpu_<N>proc
--script`), on first use of any run of that size: the runs below and those other test files add with `add_runs` (MoE
expert parallel, preference tuning, distillation, contrastive training), so every trainer test under msrun shares
two launches; the worker trains every run of that size one after the other (one start-up, one communicator), each
into its own directory (`job.run_dir(name)`), its log lines in `job.log(name, rank)`. The tests read those
directories and compare them with one-process runs of the same recipes (`tests/conftest.py` `one_process`, cached
per session, so a reference trains once for every test).

Recipes:
- SMOKE: `debug=smoke` at global batch 8. Its one-process reference (REFERENCES["smoke"]) runs 20 steps with a
  checkpoint every 2 steps: dp2 compares its 20 steps, dp2_zero2 (2 accumulation steps: gradient shards
  accumulate) its first 4 (steps 1-5 are warmup, optim.warmup_steps=5, so their learning rate does not depend on
  train.num_steps) and its step-2 optimizer state.
- FP8: 4 steps of FP8 training with a closing sample (dp2 vs one process).
- TPCP: the debug model on a corpus of short documents (written by the `tpcp_data` fixture), 32-token windows,
  20 steps, checkpoints at 9, 18 and 20; with `data.document_mask=true` for the context-parallel run. TP and CP
  run composed with DP on 4 workers (tp2_dp2, cp2_dp2: every assertion a tp2 or cp2 run would carry, on ranks
  that also reduce over DP); the tp2_dp2 run's step-18 checkpoint resumes in one process (2 steps are enough to
  show the state carries over).
- TPZ: one KV head (replicated over TP), 6 steps, checkpoints every 2: ZeRO-2 with cp2 and with tp2_dp2, both
  resumed from the one-process run's step-2 checkpoint (one process -> a sharded layout).
FP8, TPZ and dp2_zero2 train without validation (train.val_batches=0: no evaluation graph to compile; their tests
compare training steps and checkpoints only, and check that no record carries a val_loss).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"

NUM_STEPS = 20
SMOKE = ["debug=smoke", "train.global_batch_size=8", "train.log_every=1", "train.progress=false",
         "train.sample_tokens=0"]
FP8_STEPS = 4
FP8 = ["debug=smoke", "precision=fp8", f"train.num_steps={FP8_STEPS}", "train.global_batch_size=8",
       "train.log_every=1", "train.val_batches=0", f"train.ckpt_every={FP8_STEPS}", "train.progress=false",
       "train.sample_tokens=4"]
TPCP_RESUME = 18  # the tp2_dp2 checkpoint resumed in one process (checkpoints at 9, 18, 20)
TPCP = ["debug=smoke", f"train.num_steps={NUM_STEPS}", "train.global_batch_size=4", "data.seq_len=32",
        "train.log_every=1", f"train.val_every={NUM_STEPS}", "train.val_batches=1", "train.ckpt_every=9",
        "train.progress=false", "train.sample_tokens=4", "optim.lr=1e-3"]
DOCS = ["data.document_mask=true"]
TPZ_STEPS = 6
TPZ = ["debug=smoke", "model.num_kv_heads=1", f"train.num_steps={TPZ_STEPS}", "train.global_batch_size=8",
       "train.log_every=1", "train.val_batches=0", "train.ckpt_every=2", "train.progress=false",
       "train.sample_tokens=0", "train.keep_last=10"]


def checkpoint(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


JOBS = {2: ["dp2", "fp8_dp2", "dp2_zero2", "cp2_zero2"],
        4: ["tp2_dp2", "cp2_dp2", "tp2_dp2_zero2"]}
# Runs other test files add to these jobs (add_runs), built when the job launches: {workers: [(names, build)]}
EXTRA: dict[int, list[tuple[tuple[str, ...], Callable[[TrainerJobs], dict[str, list[str]]]]]] = {2: [], 4: []}


def add_runs(workers: int, names: tuple[str, ...], build: Callable[[TrainerJobs], dict[str, list[str]]]) -> None:
    """Add the runs `names` to the msrun job of `workers` workers (one launch per world size for every trainer
    test): `build(jobs) -> {name: overrides}` runs when that job launches (it may train one-process references
    through `jobs.one_process` and write data under `jobs.data_dir(...)`); each run names its own layout, and the
    job adds cluster and train.output_dir. A test file calls this at import, so the job holds the runs of the
    files collected; its tests then read `jobs.run_dir(name)` and `jobs.log(name, rank)`."""
    if any(tuple(names) == known for known, _ in EXTRA[workers]):
        return  # the same file imported again (under another module name)
    clash = set(names) & set(JOBS[workers])
    if clash:
        raise ValueError(f"run names {sorted(clash)} are already in the {workers}-worker trainer job")
    JOBS[workers].extend(names)
    EXTRA[workers].append((tuple(names), build))


class TrainerJobs:
    """The references (one process) and the msrun runs of every recipe above.

    root: a fresh directory; one_process: the session's `OneProcess`; cache: the data-cache override shared by the
    session; tpcp_data: the TPCP corpus overrides (data.path, data.cache_dir)."""

    def __init__(self, root: Path, one_process, cache: str, tpcp_data: list[str]):
        self.root, self.one_process, self.cache, self.done = root, one_process, cache, {}
        self.references = {
            "smoke": [*SMOKE, cache, f"train.num_steps={NUM_STEPS}", f"train.val_every={NUM_STEPS}",
                      "train.ckpt_every=2", "train.keep_last=10"],
            "fp8": [*FP8, cache],
            "plain": [*TPCP, *tpcp_data],
            "masked": [*TPCP, *tpcp_data, *DOCS],
            "tpz": [*TPZ, cache],
        }

    def reference(self, name: str) -> tuple[dict, Path, list[str]]:
        """(summary, run dir, overrides) of the one-process run `name`, trained on first use."""
        overrides = self.references[name]
        return (*self.one_process(overrides), overrides)

    def runs(self, workers: int) -> dict[str, list[str]]:
        """{run name: overrides} of the job with `workers` workers (every run names its own layout). Trains the
        references the resumed runs start from."""
        ref, cache = self.references, self.cache
        if workers == 2:
            runs = {
                "dp2": [*SMOKE, cache, f"train.num_steps={NUM_STEPS}", f"train.val_every={NUM_STEPS}",
                        f"train.ckpt_every={NUM_STEPS}", "parallel=dp2"],
                "fp8_dp2": [*ref["fp8"], "parallel=dp2"],
                "dp2_zero2": [*SMOKE, cache, "train.num_steps=4", "train.val_batches=0", "train.ckpt_every=2",
                              "parallel=dp2_zero2", "train.grad_accum_steps=2"],  # shards accumulate
                # one process -> ZeRO-2 over the CP group (dp=1), from the reference's step 2 (warmup: see above)
                "cp2_zero2": [*ref["tpz"], "train.num_steps=4", "parallel=cp2", "parallel.zero_stage=2",
                              f"train.resume={checkpoint(self.reference('tpz')[1], 2)}"],
            }
        else:
            runs = {
                "tp2_dp2": [*ref["plain"], "parallel=tp2_dp2"],
                "cp2_dp2": [*ref["masked"], "parallel=cp2_dp2"],
                # one process -> ZeRO-2 x TP x DP, from the reference's step 2 (steps 1-5 are warmup: see above)
                "tp2_dp2_zero2": [*ref["tpz"], "train.num_steps=4", "parallel=tp2_dp2", "parallel.zero_stage=2",
                                  f"train.resume={checkpoint(self.reference('tpz')[1], 2)}"],
            }
        for names, build in EXTRA[workers]:
            extra = build(self)
            assert tuple(extra) == names, (tuple(extra), names)
            runs.update(extra)
        assert list(runs) == JOBS[workers]
        return runs

    def data_dir(self, name: str) -> Path:
        """A directory of this session for the data of `name` (created on first use)."""
        path = self.root / "data" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def planned_dir(self, name: str) -> Path:
        """The directory the msrun run `name` writes (without launching its job): for a later run of the same
        job that resumes from it."""
        workers = next(w for w, names in JOBS.items() if name in names)
        return self.root / f"job{workers}" / "runs" / name

    def job(self, workers: int):
        """The finished launch (stdout, stderr) of the job with `workers` workers; launched on first use."""
        if workers not in self.done:
            from tests.conftest import launch

            runs = self.runs(workers)
            job_dir = self.root / f"job{workers}"  # the launch's train.output_dir (msrun_log/), runs/<name>
            spec = self.root / f"job{workers}.json"
            spec.write_text(json.dumps({"log_dir": str(self.root / f"logs{workers}"), "runs": [
                {"name": name, "overrides": [*overrides, f"cluster=cpu_{workers}proc",
                                             f"train.output_dir={job_dir / 'runs' / name}"]}
                for name, overrides in runs.items()]}))
            layout = "parallel=dp2" if workers == 2 else "parallel=tp2_dp2"
            start = time.monotonic()
            self.done[workers] = None  # a failed job is not launched again by the next test
            self.done[workers] = launch(job_dir, [layout], workers, WORKERS / "train_worker.py", [str(spec)])
            print(f"{workers}-worker msrun job, {len(runs)} runs: {time.monotonic() - start:.1f} s", file=sys.stderr)
        if self.done[workers] is None:
            raise AssertionError(f"the {workers}-worker trainer job failed (see the first test that used it)")
        return self.done[workers]

    def run_dir(self, name: str) -> Path:
        """The directory of the msrun run `name` (its job launched on first use)."""
        workers = next(w for w, names in JOBS.items() if name in names)
        self.job(workers)
        return self.planned_dir(name)

    def log(self, name: str, rank: int) -> str:
        """Rank `rank`'s log lines of the run `name` (its job launched on first use)."""
        workers = next(w for w, names in JOBS.items() if name in names)
        self.job(workers)
        return (self.root / f"logs{workers}" / name / f"worker_{rank}.log").read_text()

    def msrun_log_dir(self, workers: int) -> Path:
        self.job(workers)
        return self.root / f"job{workers}" / "msrun_log"
