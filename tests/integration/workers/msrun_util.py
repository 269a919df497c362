"""Launch a worker script under real msrun (CPU, MCCL) for the parallel tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ascend_llm.cluster.launch import find_free_port, msrun_executable

ROOT = Path(__file__).resolve().parents[3]


def run_msrun(script: Path, out_dir: Path, *args: str, workers: int = 2) -> None:
    """msrun `script out_dir args...` with `workers` local workers; asserts every worker succeeded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    argv = [msrun_executable(), f"--worker_num={workers}", f"--local_worker_num={workers}",
            f"--master_port={find_free_port()}", f"--log_dir={out_dir / 'log'}", "--join=True",
            "--cluster_time_out=300", str(script), str(out_dir), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=out_dir)
    logs = "".join((out_dir / "log" / f"worker_{r}.log").read_text()[-3000:] for r in range(workers)
                   if (out_dir / "log" / f"worker_{r}.log").exists())
    assert done.returncode == 0, done.stderr[-2000:] + logs
