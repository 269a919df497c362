"""msrun worker: several trainer runs, one after the other, in one msrun job (one start-up for all of them).

`ascend-llm launch cluster=cpu_<N>proc parallel=<an N-rank layout> train.output_dir=ROOT --script train_worker.py
-- SPEC` (tests/conftest.launch does this). SPEC is a JSON file `{"log_dir": str, "runs": [{"name": str,
"overrides": [str, ...]}, ...]}`;
every rank runs each entry in order: `train(compose_recipe(overrides))`, the overrides naming the run's own
`train.output_dir`, layout (`parallel=...`) and `cluster=cpu_<N>proc`. The communicator (`init_distributed`) and
the groups (`comm.new_group`) are initialised once, before the first run, and reused by every run (the
re-entrant paths a notebook or an in-process sweep takes too). The trainer's log lines of each run
also go to <log_dir>/<name>/worker_<rank>.log (the final-parameter digest with its coordinates is read there).
A failing run raises: the launcher stops the job and names the rank.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path


def run_all(log_root: Path, runs: list[dict]) -> None:
    from ascend_llm.cli.process import freeze_imported_objects
    from ascend_llm.cli.streams import configure_logging
    from ascend_llm.compose import compose_recipe
    from ascend_llm.parallel.dp import init_distributed
    from ascend_llm.train.runtime import setup_runtime
    from ascend_llm.train.trainer import train

    configure_logging()
    freeze_imported_objects()  # as `ascend-llm train` does: this process runs many compiles
    recipes = [compose_recipe(run["overrides"]) for run in runs]  # every recipe checked before the first run
    setup_runtime(recipes[0].runtime)
    # the msrun scheduler runs this file too and exits inside init: nothing below runs in it
    rank, _ = init_distributed(recipes[0].parallel, recipes[0].cluster)
    package_log = logging.getLogger("ascend_llm")
    for run, recipe in zip(runs, recipes):
        log_dir = log_root / run["name"]
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / f"worker_{rank}.log")
        handler.setFormatter(logging.Formatter("[ascend_llm] %(message)s"))
        package_log.addHandler(handler)
        print(f"[train_worker] rank {rank}: run {run['name']}", flush=True)
        start, cpu = time.monotonic(), time.process_time()
        try:
            train(recipe)
        finally:
            package_log.removeHandler(handler)
            handler.close()
        print(f"[train_worker] rank {rank}: run {run['name']} done in {time.monotonic() - start:.1f} s "
              f"({time.process_time() - cpu:.1f} CPU-s)", flush=True)


if __name__ == "__main__":
    # argv: the launch overrides (unused: each run names its own), then SPEC
    spec = json.loads(Path(sys.argv[-1]).read_text())
    run_all(Path(spec["log_dir"]), spec["runs"])
