"""ZeRO-1 and ZeRO-2 under real msrun on CPU (2 workers): 20 steps of the sharded AdamW equal the unsharded
AdamW on the same global batch (losses and parameters within float tolerance), each rank holds half the
optimizer state, the gathered (layout-free) state equals the unsharded one, and one process resumes from it
and continues like the reference. The reference (the unsharded AdamW on the whole batches, then RESUME_STEPS
more steps) trains once, here in the test's process; the msrun job runs only the sharded runs."""

from __future__ import annotations

import json
from math import ceil
from pathlib import Path

import numpy as np
import pytest
from zero_worker import CLIP, NUM_STEPS, RESUME_STEPS, SEED, batch, lr_at, seeded_grads

# one pytest-xdist worker runs every test of the layout jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("layout_jobs")


@pytest.fixture(scope="module")
def job(layout_jobs) -> Path:
    """workers/zero_worker.py's reports: both stages, run in turn in the 2-worker msrun job of `layout_jobs`."""
    return layout_jobs.dir("zero")


def planned_state_bytes(stage: int) -> float:
    from ascend_llm.compose import compose_recipe
    from ascend_llm.parallel.plan import plan_recipe

    recipe = compose_recipe(["model=debug", "cluster=cpu_2proc", f"parallel=dp2_zero{stage}"])
    return plan_recipe(recipe).memory.term("optimizer state (AdamW m, v)").bytes


def unsharded(seed: int):
    """(step(x, y, lr) -> loss, optimizer, parameters, vocabulary size): the debug model with the plain AdamW,
    clipped at CLIP."""
    import mindspore as ms

    from ascend_llm.compose import compose_recipe
    from ascend_llm.optim.adamw import AdamW, clip_by_global_norm

    recipe = compose_recipe(["model=debug"])
    params, grad_fn = seeded_grads(recipe, seed)
    optimizer = AdamW(params, recipe.optim)

    @ms.jit
    def step(x, y, lr):
        loss, grads = grad_fn(x, y)
        grads, _ = clip_by_global_norm(grads, CLIP)
        optimizer(grads, lr)
        return loss

    return step, optimizer, params, recipe.model.vocab_size


def train(step, vocab: int, first: int, last: int) -> list[float]:
    """Losses of global steps first..last-1 on the whole batches (one process)."""
    from mindspore import Tensor

    return [float(step(Tensor(x), Tensor(y), Tensor(lr_at(i))).asnumpy())
            for i in range(first, last) for x, y in [batch(i, vocab)]]


@pytest.fixture(scope="module")
def reference() -> dict:
    """The unsharded run: losses, final parameters and AdamW state after NUM_STEPS, state bytes, and the losses
    of RESUME_STEPS more steps."""
    step, optimizer, params, vocab = unsharded(SEED)
    losses = train(step, vocab, 0, NUM_STEPS)
    # copies: asnumpy() shares the parameter's buffer, which the RESUME_STEPS steps below update in place
    out = {"losses": losses, "params": {p.name: p.asnumpy().copy() for p in params},
           "state": {p.name: p.asnumpy().copy() for p in optimizer.state_parameters()},
           "state_bytes": sum(int(p.size) * p.itemsize for p in optimizer.state_parameters())}
    out["resumed_losses"] = train(step, vocab, NUM_STEPS, NUM_STEPS + RESUME_STEPS)
    return out


def resume_in_one_process(state_file: Path) -> list[float]:
    from mindspore import Tensor

    step, optimizer, params, vocab = unsharded(0)  # a different init: everything comes from the checkpoint
    saved = np.load(state_file)
    for p in params:
        p.set_data(Tensor(saved["param." + p.name]))
    for p in optimizer.state_parameters():
        p.set_data(Tensor(saved["opt." + p.name]))
    return train(step, vocab, NUM_STEPS, NUM_STEPS + RESUME_STEPS)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_unsharded_adamw_under_msrun(job, reference, stage):
    reports = [json.loads((job / f"stage{stage}_rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["stage"] == stage
        # the global loss (mean over both ranks' halves) equals the one-process loss on the whole batch
        np.testing.assert_allclose(rep["zero_losses"], reference["losses"], rtol=0, atol=1e-5)
        saved = np.load(job / f"stage{stage}_rank{rep['rank']}.npz")
        params = {k[6:]: saved[k] for k in saved.files if k.startswith("param.")}
        state = {k[4:]: saved[k] for k in saved.files if k.startswith("opt.")}
        assert sorted(params) == sorted(reference["params"])
        assert max(np.abs(params[n] - reference["params"][n]).max() for n in params) < 1e-5
        # the gathered (layout-free) state has the unsharded names and values; re-sharding it gives the shards
        assert sorted(state) == sorted(reference["state"])
        assert max(np.abs(state[k].astype(np.float64) - reference["state"][k]).max() for k in state) < 1e-5
        assert rep["reload_diff"] == 0.0
        # each rank keeps ceil(n/2) elements of m and v per parameter (+ the 4-byte step): half the unsharded
        # state, and exactly what `ascend-llm plan` counts for this recipe
        sizes = rep["param_sizes"]
        assert rep["zero_state_bytes"] == sum(ceil(n / 2) for n in sizes) * 8 + 4
        assert reference["state_bytes"] == sum(sizes) * 8 + 4
        assert abs(rep["zero_state_bytes"] - reference["state_bytes"] / 2) <= 4 * len(sizes)
        assert rep["zero_state_bytes"] == planned_state_bytes(stage)
        print(f"stage {stage} rank {rep['rank']}: optimizer state {rep['zero_state_bytes']:,} bytes vs "
              f"{reference['state_bytes']:,} unsharded")
    assert reports[0]["zero_losses"] == reports[1]["zero_losses"]
    resumed = resume_in_one_process(job / f"stage{stage}_rank0.npz")
    np.testing.assert_allclose(resumed, reference["resumed_losses"], rtol=0, atol=1e-5)
