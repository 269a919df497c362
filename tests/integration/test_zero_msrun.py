"""ZeRO-1 and ZeRO-2 under real msrun on CPU (2 workers): 20 steps of the sharded AdamW equal the unsharded
AdamW on the same global batch (losses and parameters within float tolerance), each rank holds half the
optimizer state, the gathered (layout-free) state equals the unsharded one, and one process resumes from it
and continues like the reference."""

from __future__ import annotations

import json
from math import ceil
from pathlib import Path

import numpy as np
import pytest
from zero_worker import CLIP, NUM_STEPS, RESUME_STEPS, batch, lr_at

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


def resume_in_one_process(state_file: Path) -> list[float]:
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.compose import compose_recipe
    from ascend_llm.models import build_model
    from ascend_llm.optim.adamw import AdamW, clip_by_global_norm
    from ascend_llm.train.step import cross_entropy_loss

    recipe = compose_recipe(["model=debug"])
    model = build_model(recipe.model, seed=0)  # a different init: everything comes from the checkpoint
    params = model.trainable_params()
    optimizer = AdamW(params, recipe.optim)
    saved = np.load(state_file)
    for p in params:
        p.set_data(Tensor(saved["param." + p.name]))
    for p in optimizer.state_parameters():
        p.set_data(Tensor(saved["opt." + p.name]))

    def forward(x, y):
        return cross_entropy_loss(model(x), y)

    grad_fn = ms.value_and_grad(forward, None, params)

    @ms.jit
    def step(x, y, lr):
        loss, grads = grad_fn(x, y)
        grads, _ = clip_by_global_norm(grads, CLIP)
        optimizer(grads, lr)
        return loss

    losses = []
    for i in range(NUM_STEPS, NUM_STEPS + RESUME_STEPS):
        x, y = batch(i, recipe.model.vocab_size)
        losses.append(float(step(Tensor(x), Tensor(y), Tensor(lr_at(i))).asnumpy()))
    return losses


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_unsharded_adamw_under_msrun(job, stage):
    reports = [json.loads((job / f"stage{stage}_rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world"] == 2 and rep["stage"] == stage
        # the global loss (mean over both ranks' halves) equals the one-process loss on the whole batch
        np.testing.assert_allclose(rep["zero_losses"], rep["ref_losses"], rtol=0, atol=1e-5)
        assert rep["max_param_diff"] < 1e-5
        assert rep["full_state_keys_match"] and rep["state_diff"] < 1e-5 and rep["reload_diff"] == 0.0
        # each rank keeps ceil(n/2) elements of m and v per parameter (+ the 4-byte step): half the unsharded
        # state, and exactly what `ascend-llm plan` counts for this recipe
        sizes = rep["param_sizes"]
        assert rep["zero_state_bytes"] == sum(ceil(n / 2) for n in sizes) * 8 + 4
        assert rep["unsharded_state_bytes"] == sum(sizes) * 8 + 4
        assert abs(rep["zero_state_bytes"] - rep["unsharded_state_bytes"] / 2) <= 4 * len(sizes)
        assert rep["zero_state_bytes"] == planned_state_bytes(stage)
        print(f"stage {stage} rank {rep['rank']}: optimizer state {rep['zero_state_bytes']:,} bytes vs "
              f"{rep['unsharded_state_bytes']:,} unsharded")
    assert reports[0]["zero_losses"] == reports[1]["zero_losses"]
    resumed = resume_in_one_process(job / f"stage{stage}_state.npz")
    np.testing.assert_allclose(resumed, reports[0]["ref_resumed_losses"], rtol=0, atol=1e-5)
