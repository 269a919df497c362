"""Shared test setup: CPU graph mode, paths to the shared corpora beside the project, and the helpers of the tests
that start processes or train:

- `run_msrun(script, out_dir, *args, workers)`: a worker script under real msrun (raw: no recipe);
- `launch(run_dir, overrides, workers, script=None, script_args=())`: `ascend-llm launch` of a recipe (or a script)
  on `workers` CPU workers, into run_dir, on a free port; asserts it succeeded;
- `raise_priority`: the preexec_fn of a subprocess that runs msrun jobs (they run ahead of the pytest workers);
- `read_records(run_dir)` / `records_by_step(run_dir)`: a run's metrics.jsonl, every line parsed strictly;
- the `one_process` session fixture: one-process trainer runs cached by their overrides, so a reference that several
  tests compare against trains once per session.

Import them with `from tests.conftest import ...` (the project root is put on sys.path below, so this also works
under a bare `pytest`)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def cpu_graph_mode():
    """CPU graph mode; under pytest-xdist the workers share the cores as `launch` shares them among the workers of
    a node (cluster/launch.py worker_threads_env): OMP_NUM_THREADS = cores // workers for this process's kernels
    and the trainers it starts, unless already set. The garbage collector skips what exists at the first test and
    runs less often (the unit tests on 2 workers spent 22-24 CPU-s in full collections, 4-5 with this)."""
    import mindspore as ms

    from ascend_llm.cli.process import freeze_imported_objects
    from ascend_llm.cluster.launch import worker_threads_env
    from ascend_llm.config.runtime import RuntimeConfig
    from ascend_llm.train.runtime import cpu_threads, set_cpu_threads

    os.environ.update(worker_threads_env(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    freeze_imported_objects()  # collected tests and imported modules: out of every later full collection's scan
    gc.set_threshold(2000, 20, 20)  # fewer collections while graphs compile (Python's default: 700, 10, 10)
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    set_cpu_threads(cpu_threads(RuntimeConfig()))
    yield


@pytest.fixture
def tang_poems() -> Path:
    path = CORPORA / "tang_poems.jsonl"
    if not path.is_file():
        pytest.skip(f"shared corpus absent: {path}")
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenized-corpus cache for the whole session (tokenizer training runs once)."""
    return str(tmp_path_factory.mktemp("data_cache"))


def find_free_port() -> int:
    """A free TCP port on localhost for an msrun scheduler (the launcher's own helper)."""
    from ascend_llm.cluster.launch import find_free_port as free_port

    return free_port()


def _worker_logs(log_dir: Path, chars: int = 3000) -> str:
    return "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-chars:]
                   for p in sorted(Path(log_dir).glob("worker_*.log")))


JOB_NICE = -5  # the msrun jobs' priority relative to the pytest workers


def raise_priority() -> None:
    """preexec_fn of an msrun job: its ranks wait for each other in every collective, so a rank that the other
    pytest-xdist worker preempts stalls its peers (each spinning in MindSpore's queue wait); the job runs ahead of
    the pytest workers where this process may raise priorities (root, CAP_SYS_NICE), unchanged elsewhere."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, JOB_NICE)
    except OSError:
        pass


def run_msrun(script: Path, out_dir: Path, *args: str, workers: int = 2, timeout: int = 600) -> None:
    """msrun `script out_dir args...` with `workers` local workers (CPU, MCCL), the launcher's kernel threads per
    worker (OMP_NUM_THREADS) and the CPU recipes' 1-second heartbeat (cluster/launch.py); asserts every worker
    succeeded."""
    from ascend_llm.cluster.launch import heartbeat_env, msrun_executable, worker_threads_env

    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **worker_threads_env(workers), **heartbeat_env(1),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    argv = [msrun_executable(), f"--worker_num={workers}", f"--local_worker_num={workers}",
            f"--master_port={find_free_port()}", f"--log_dir={out_dir / 'log'}", "--join=True",
            "--cluster_time_out=300", str(script), str(out_dir), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=out_dir,
                          preexec_fn=raise_priority)
    assert done.returncode == 0, done.stderr[-2000:] + _worker_logs(out_dir / "log")


def launch(run_dir: Path, overrides: Sequence[str], workers: int, script: Path | None = None,
           script_args: Sequence[str] = (), timeout: int = 1300) -> subprocess.CompletedProcess:
    """`ascend-llm launch cluster=cpu_<workers>proc <overrides> train.output_dir=<run_dir>` on a free port
    (`--script script -- script_args` when given); asserts exit 0 (showing stdout, stderr and the workers' log
    tails) and returns the finished process. The overrides name the layout (`parallel=...`)."""
    argv = [f"cluster=cpu_{workers}proc", *overrides, f"train.output_dir={run_dir}",
            f"cluster.master_port={find_free_port()}", "cluster.cluster_timeout_s=300",
            f"cluster.job_timeout_s={timeout - 100}"]
    if script is not None:
        argv += ["--script", str(script), "--", *script_args]
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "launch", *argv],
                          capture_output=True, text=True, timeout=timeout, preexec_fn=raise_priority)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + _worker_logs(run_dir / "msrun_log")
    return done


def read_records(run_dir: Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl, in file order; a line that is not JSON fails the test."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def records_by_step(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_records(run_dir)}


class OneProcess:
    """One-process trainer runs, each trained once per session: `self(overrides) -> (summary, run_dir)`."""

    def __init__(self, root: Path):
        self.root, self.runs = root, {}

    def __call__(self, overrides: Sequence[str]) -> tuple[dict, Path]:
        key = tuple(overrides)
        if key not in self.runs:
            from ascend_llm.compose import compose_recipe
            from ascend_llm.train.trainer import train

            run_dir = self.root / f"run{len(self.runs)}"
            self.runs[key] = train(compose_recipe([*key, f"train.output_dir={run_dir}"])), run_dir
        return self.runs[key]


@pytest.fixture(scope="session")
def one_process(tmp_path_factory) -> OneProcess:
    return OneProcess(tmp_path_factory.mktemp("one_process"))


def open_fixture(path: Path) -> tuple:
    """(model, ModelConfig, HFTokenizer) of a model directory, through the one model opener."""
    from ascend_llm.interop.source import open_model

    opened = open_model(path)
    return opened.model, opened.config, opened.tokenizer
