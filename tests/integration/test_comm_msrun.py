"""comm.py under real msrun on CPU (2 workers): every collective, forward and backward, over the world group
(native MCCL AllReduce/AllGather) and over a sub-group (the AllReduce-based equivalents), against NumPy.

The worker's loss on rank r is sum(out_r * out_r * w_r), so dL/dout_r = 2 out_r w_r, and the total loss is the
sum over ranks: each op's input gradient is the adjoint collective applied to those output gradients."""

from __future__ import annotations

import numpy as np
import pytest
from comm_worker import inputs

# one pytest-xdist worker runs every test of the layout jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("layout_jobs")


@pytest.fixture(scope="module")
def comm_results(layout_jobs):
    """Each rank's results: workers/comm_worker.py, run in the 2-worker msrun job of the `layout_jobs` fixture."""
    out = layout_jobs.dir("comm")
    return [dict(np.load(out / f"comm_rank{r}.npz")) for r in range(2)]


def reference(case: str, xs: list[np.ndarray], ws: list[np.ndarray]):
    """(outputs per rank, input gradients per rank) of `case` in float64, from the definitions."""
    n = len(xs)
    xs = [x.astype(np.float64) for x in xs]
    if case == "sum":
        outs = [sum(xs)] * n
    elif case == "max":
        outs = [np.maximum.reduce(xs)] * n
    elif case.startswith("gather"):
        outs = [np.concatenate(xs, axis=int(case[-1]))] * n
    elif case.startswith("scatter"):
        axis = int(case[-1])
        outs = np.split(sum(xs), n, axis=axis)
    else:  # bcast1: root is group rank 1
        outs = [xs[1]] * n
    douts = [2 * o * w[:o.shape[0], :o.shape[1]] for o, w in zip(outs, ws)]
    if case == "sum":
        dxs = [sum(douts)] * n
    elif case == "max":
        dxs = [np.zeros_like(x) for x in xs]
    elif case.startswith("gather"):
        dxs = np.split(sum(douts), n, axis=int(case[-1]))
    elif case.startswith("scatter"):
        dxs = [np.concatenate(douts, axis=int(case[-1]))] * n
    else:
        dxs = [np.zeros_like(xs[0]), sum(douts)]
    return outs, dxs


CASES = ["sum", "max", "gather0", "gather1", "scatter0", "scatter1", "bcast1"]


@pytest.mark.parametrize("group", ["world", "sub"])
@pytest.mark.parametrize("case", CASES)
def test_collective_matches_numpy(comm_results, group, case):
    xs, ws = zip(*(inputs(r) for r in range(2)))
    outs, dxs = reference(case, list(xs), list(ws))
    for r in range(2):
        got = comm_results[r]
        np.testing.assert_allclose(got[f"{group}_{case}_out"], outs[r], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[f"{group}_{case}_probe"], outs[r], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[f"{group}_{case}_dx"], dxs[r], rtol=1e-5, atol=1e-5)
