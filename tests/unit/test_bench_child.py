"""The benchmark child runner reports the child's own peak RSS, not the parent's (ru_maxrss carries over)."""

from __future__ import annotations

import resource
import sys

import numpy as np

from ascend_llm.bench.child import run_child

ALLOCATE = "import numpy as np, time; a = np.ones({mib} * 2**18, np.float32); time.sleep(0.5); print(a.size)"


def test_child_peak_is_its_own_not_the_parents():
    ballast = np.ones(400 * 2**18, np.float32)  # 400 MiB touched in the parent
    parent_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    small = run_child([sys.executable, "-c", ALLOCATE.format(mib=20)])
    big = run_child([sys.executable, "-c", ALLOCATE.format(mib=250)])
    assert small.returncode == 0 and small.stdout.strip() == str(20 * 2**18)
    assert big.peak_rss_mib - small.peak_rss_mib > 200  # the 230 MiB difference is seen
    assert small.peak_rss_mib < parent_peak_mib - 300  # and the parent's ballast is not
    assert ballast[-1] == 1.0


def test_child_failure_keeps_its_stderr():
    result = run_child([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    assert result.returncode == 3 and result.stderr == "boom"
