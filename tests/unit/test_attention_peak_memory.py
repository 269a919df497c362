"""The benchmark's own-process peak memory: a known NumPy allocation is measured to within -2/+8 MiB (allocator
bookkeeping), by the exact VmHWM reset and by the sampling fallback, and a child process reports its own peak,
not its parent's."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from ascend_llm.bench import peak_memory
from ascend_llm.bench.peak_memory import PeakMemory

MIB = 2**20


def allocate_touched(mib: int, hold_s: float = 0.0) -> None:
    """An array of exactly `mib` MiB with every page written, held `hold_s` seconds, then freed."""
    block = np.ones(mib * MIB // 8, dtype=np.float64)
    time.sleep(hold_s)
    del block


def test_vmhwm_window_measures_a_known_allocation():
    allocate_touched(64)  # earlier, bigger-than-baseline peak: must not count in the window below
    with PeakMemory() as meter:
        allocate_touched(96)
    report = meter.report
    assert report.method == "vmhwm"
    assert 96 - 2 <= report.growth_mib <= 96 + 8, report
    assert abs(report.peak_mib - report.baseline_mib - report.growth_mib) < 1e-9


def test_sampling_fallback_measures_a_known_allocation(monkeypatch):
    monkeypatch.setattr(peak_memory, "reset_peak", lambda: False)
    with PeakMemory(interval_s=0.002) as meter:
        allocate_touched(80, hold_s=0.1)
    assert meter.report.method == "sampled"
    assert 80 - 2 <= meter.report.growth_mib <= 80 + 8, meter.report


CHILD = """
import json, resource
from ascend_llm.bench.peak_memory import PeakMemory
import numpy as np
with PeakMemory() as meter:
    a = np.ones(32 * 2**20 // 8); del a
print(json.dumps({"peak": meter.report.peak_mib, "growth": meter.report.growth_mib,
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_child_reports_its_own_peak_not_the_parents():
    allocate_touched(384)  # the parent's high-water mark, inherited by the child's ru_maxrss
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ru_maxrss"] >= 384, got  # the defect the helper avoids: ru_maxrss survives fork + exec
    assert got["peak"] < 200, got  # python + numpy + 32 MiB
    assert 32 - 2 <= got["growth"] <= 32 + 8, got
