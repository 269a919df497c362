"""A worker that fails mid-run under real msrun makes `ascend-llm launch` exit non-zero well within the
configured cluster timeout, naming the rank and showing the tail of its log; nothing is left running."""

from __future__ import annotations

import subprocess
import sys
import time

from ascend_llm.cluster.launch import find_free_port
from tests.conftest import raise_priority

# Real communication: both ranks init (MCCL), all-reduce every step; rank 1 raises at step 2 while rank 0
# is about to wait in the next all-reduce.
WORKER = """
import sys
import numpy as np
from ascend_llm.compose import compose_recipe

recipe = compose_recipe(sys.argv[1:])
import mindspore as ms
from mindspore import Tensor

ms.set_device("CPU")
from ascend_llm.parallel.dp import build_grad_reducer, init_distributed

rank, world = init_distributed(recipe.parallel, recipe.cluster)
reduce = build_grad_reducer(None, world)
for step in range(5):
    mean = reduce((Tensor(np.full(2, rank + 1.0, np.float32)),))[0].asnumpy()
    assert np.allclose(mean, 1.5), mean
    print(f"rank {rank} step {step} ok", flush=True)
    if rank == 1 and step == 2:
        raise RuntimeError("injected failure at step 2")
"""


def test_failed_worker_is_named_and_the_job_stops(tmp_path):
    script = tmp_path / "failing_worker.py"
    script.write_text(WORKER)
    cluster_timeout = 90
    overrides = ["cluster=cpu_2proc", "parallel=dp2", f"train.output_dir={tmp_path / 'run'}",
                 f"cluster.master_port={find_free_port()}", f"cluster.cluster_timeout_s={cluster_timeout}",
                 "cluster.failure_grace_s=3", "cluster.tail_worker_log=none"]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "launch", *overrides, "--script", str(script)],
                          capture_output=True, text=True, timeout=cluster_timeout + 60, preexec_fn=raise_priority)
    elapsed = time.monotonic() - start
    print(f"failing msrun job stopped after {elapsed:.1f} s")
    assert done.returncode not in (0, 2), done.stderr[-3000:]
    assert elapsed < cluster_timeout, f"took {elapsed:.0f} s: longer than cluster.cluster_timeout_s"
    err = done.stderr
    assert "launch failed" in err and "rank 1: worker exited with code 1" in err, err[-3000:]
    assert "--- last" in err and "worker_1.log" in err
    assert "RuntimeError: injected failure at step 2" in err
    assert "rank 1 step 2 ok" in err  # the tail shows what the rank did before failing
    leftovers = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.strip()
    assert not leftovers, f"processes still running: {leftovers}"
