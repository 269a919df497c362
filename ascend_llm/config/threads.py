"""CPU kernel threads as the environment states them: the cores a process may use and $OMP_NUM_THREADS read as
OpenMP writes it. Used by the launcher (cluster/launch.py: workers sharing a node), the trainer's runtime
(train/runtime.py: runtime.num_threads=0), the CLI (checked before MindSpore loads) and the fused decode pool
(inference/cpu_pool.py)."""

from __future__ import annotations

import os
from typing import Optional

from ascend_llm.errors import ConfigError

THREADS_ENV = "OMP_NUM_THREADS"


def available_cpus() -> int:
    """CPU cores this process may run on: its affinity mask (a container's or taskset's limit), else
    os.cpu_count(); at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def parse_threads(field: str, value: str) -> Optional[int]:
    """Kernel threads from an OMP_NUM_THREADS value: None when empty; OpenMP's nested list form ("4,2") counts
    its first entry. ConfigError naming `field` unless that is a positive integer (ASCII digits)."""
    if not str(value).strip():
        return None
    first = str(value).split(",")[0].strip()
    if not (first.isascii() and first.isdigit()) or int(first) < 1:
        raise ConfigError(field, value, "must be a positive integer, or OpenMP's list form like 4,2 (its first "
                                        "entry counts): the CPU kernel threads of each process")
    return int(first)


def env_threads() -> Optional[int]:
    """$OMP_NUM_THREADS (parse_threads), None when unset or empty. ConfigError names OMP_NUM_THREADS."""
    return parse_threads(THREADS_ENV, os.environ.get(THREADS_ENV, ""))
