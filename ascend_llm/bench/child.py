"""Run a benchmark child process and measure its own peak memory.

`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` is the largest peak among all children waited for, and Linux
carries the parent's RSS into a child's `ru_maxrss` across fork and exec, so a child started by a big parent
reports the parent's size. Instead the child's `VmHWM` (the peak RSS of its own address space, which exec
replaces) is read from /proc/<pid>/status while it runs; the last reading before it exits is its peak.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildResult:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mib: float | None  # None where /proc is unavailable


def read_vmhwm_kib(pid: int) -> int | None:
    """VmHWM of a live process in KiB, or None when it has exited or /proc has no such field."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def run_child(argv: list[str], poll_s: float = 0.05, env: dict | None = None) -> ChildResult:
    """Run argv to completion; stdout/stderr go to temp files (no pipe back-pressure) and are returned as text."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        peak = None
        while proc.poll() is None:
            kib = read_vmhwm_kib(proc.pid)
            if kib is not None:
                peak = kib if peak is None else max(peak, kib)
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildResult(proc.returncode, out.read(), err.read(), wall, None if peak is None else peak / 1024)
