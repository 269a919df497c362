"""For tests/integration/test_zero_msrun.py, run as tpcp_worker.py's "zero" mode: ZeRO-1/2 AdamW over 2 ranks.

For each ZeRO stage in turn (one job serves both), each rank trains the seeded debug model with ZeroAdamW over the
world group, each rank computing the gradients of its half of every global batch, for NUM_STEPS steps. Writes
DIR/stage<s>_rank<r>.json (the loss curve, optimizer-state bytes, the re-sharding check) and DIR/stage<s>_rank<r>.npz
(this rank's final parameters as "param.<name>" and the gathered, layout-free optimizer state as "opt.<name>").
The test trains the unsharded AdamW on the whole batches itself (the one-process reference: `batch`, `lr_at`,
`CLIP` and the seed are shared from here) and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NUM_STEPS, RESUME_STEPS, ROWS, SEQ, CLIP = 20, 5, 4, 32, 1.0


def batch(step: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    tokens = rng.integers(0, vocab, size=(ROWS, SEQ + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def lr_at(step: int) -> np.float32:
    return np.float32(3e-3 * (1.0 + step) / NUM_STEPS)


SEED = 7


def seeded_grads(recipe, seed: int = SEED):
    """The debug model seeded with `seed`: (parameters, value_and_grad of its cross-entropy: (x, y) -> (loss,
    grads)). The sharded runs here and the test's unsharded reference both build theirs with it."""
    import mindspore as ms

    from ascend_llm.models import build_model
    from ascend_llm.train.step import cross_entropy_loss

    model = build_model(recipe.model, seed=seed)
    params = model.trainable_params()

    def forward(x, y):
        return cross_entropy_loss(model(x), y)

    return params, ms.value_and_grad(forward, None, params)


def build_step(recipe, world: int, stage: int):
    """The seeded model with ZeroAdamW: (step(x, y, lr) -> global mean loss, optimizer, parameters)."""
    import mindspore as ms
    from mindspore import ops

    from ascend_llm.optim.adamw import clip_by_global_norm
    from ascend_llm.parallel.dp import build_grad_reducer
    from ascend_llm.parallel.zero import ZeroAdamW

    params, grad_fn = seeded_grads(recipe)
    optimizer = ZeroAdamW(params, recipe.optim, stage, grad_clip=CLIP)
    reduce = build_grad_reducer(None, world)

    @ms.jit
    def step(x, y, lr):
        loss, grads = grad_fn(x, y)
        # comm.py's ordering rule: collectives of one graph are chained by data, so every rank issues them
        # in the same order (loss mean first, then the gradients, then the optimizer's own collectives)
        loss = reduce((loss,))[0]
        grads = ops.depend(grads, loss)
        if stage == 1:  # the trainer's path: all-reduce (mean), clip, then the optimizer
            grads = reduce(grads)
            grads, _ = clip_by_global_norm(grads, CLIP)
        optimizer(grads, lr)
        return loss

    return step, optimizer, params


def run_stage(recipe, rank: int, world: int, stage: int, out: Path) -> None:
    """NUM_STEPS sharded steps; writes this rank's report and final state (module doc)."""
    from mindspore import Tensor

    from ascend_llm.parallel.zero import ZeroAdamW

    step, optimizer, params = build_step(recipe, world, stage)
    half = ROWS // world
    local = slice(rank * half, (rank + 1) * half)
    losses = []
    for i in range(NUM_STEPS):
        x, y = batch(i, recipe.model.vocab_size)
        losses.append(float(step(Tensor(x[local]), Tensor(y[local]), Tensor(lr_at(i))).asnumpy()))
    full = optimizer.full_state_dict()  # collective: every rank
    fresh = ZeroAdamW(params, recipe.optim, stage, grad_clip=CLIP)
    fresh.load_full_state_dict(full)  # the gathered state, re-sharded: must give back the same shards
    report = {"rank": rank, "world": world, "stage": stage, "zero_losses": losses,
              "reload_diff": max(float(np.abs(a.asnumpy() - b.asnumpy()).max())
                                 for a, b in zip(fresh.state_parameters(), optimizer.state_parameters())),
              "zero_state_bytes": optimizer.state_bytes(), "param_sizes": [int(p.size) for p in params]}
    print(f"[zero_worker] stage {stage} rank {rank}: optimizer state {report['zero_state_bytes']:,} bytes",
          flush=True)
    np.savez(out / f"stage{stage}_rank{rank}.npz", **{"param." + p.name: p.asnumpy() for p in params},
             **{"opt." + k: v for k, v in full.items()})
    (out / f"stage{stage}_rank{rank}.json").write_text(json.dumps(report))


def run(out_dir: str, stages: tuple[int, ...] = (1, 2)) -> None:
    """Both stages on 2 ranks (tpcp_worker.py runs this as its "zero" mode, communication already initialised:
    init_distributed keeps it)."""
    from ascend_llm.compose import compose_recipe
    from ascend_llm.parallel.dp import init_distributed
    from ascend_llm.train.runtime import setup_runtime

    recipe = compose_recipe(["model=debug", "cluster=cpu_2proc", "parallel=dp2_zero1"])
    setup_runtime(recipe.runtime)
    rank, world = init_distributed(recipe.parallel, recipe.cluster)
    for stage in stages:
        run_stage(recipe, rank, world, stage, Path(out_dir))
