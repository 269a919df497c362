"""For tests/integration/test_zero_msrun.py, run as tpcp_worker.py's "zero" mode: ZeRO-1/2 AdamW vs the
unsharded AdamW.

For each ZeRO stage in turn (one job serves both), each rank trains two copies of the same seeded model on
the same global batches: one with ZeroAdamW over the world group (each rank computes gradients of its half of
the batch), one with the unsharded AdamW on the whole batch (no communication: the one-process reference).
Writes DIR/stage<s>_rank<r>.json with both loss curves, the largest parameter difference, optimizer-state
bytes and the checks of the layout-free state; rank 0 also writes DIR/stage<s>_state.npz (full parameters and
full optimizer state after the sharded run) and the reference's losses for RESUME_STEPS more steps, for the
one-process resume check.
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


def build_steps(recipe, world: int, stage: int):
    """Two seeded copies of the model: (zero_step, ref_step, zero_opt, ref_opt, zero_params, ref_params)."""
    import mindspore as ms
    from mindspore import ops

    from ascend_llm.models import build_model
    from ascend_llm.optim.adamw import AdamW, clip_by_global_norm
    from ascend_llm.parallel.dp import build_grad_reducer
    from ascend_llm.parallel.zero import ZeroAdamW
    from ascend_llm.train.step import cross_entropy_loss

    zero_model, ref_model = build_model(recipe.model, seed=7), build_model(recipe.model, seed=7)
    zero_params, ref_params = zero_model.trainable_params(), ref_model.trainable_params()
    zero_opt = ZeroAdamW(zero_params, recipe.optim, stage, grad_clip=CLIP)
    ref_opt = AdamW(ref_params, recipe.optim)
    reduce = build_grad_reducer(None, world)

    def zero_loss(x, y):
        return cross_entropy_loss(zero_model(x), y)

    def ref_loss(x, y):
        return cross_entropy_loss(ref_model(x), y)

    zero_grad = ms.value_and_grad(zero_loss, None, zero_params)
    ref_grad = ms.value_and_grad(ref_loss, None, ref_params)

    @ms.jit
    def zero_step(x, y, lr):
        loss, grads = zero_grad(x, y)
        # comm.py's ordering rule: collectives of one graph are chained by data, so every rank issues them
        # in the same order (loss mean first, then the gradients, then the optimizer's own collectives)
        loss = reduce((loss,))[0]
        grads = ops.depend(grads, loss)
        if stage == 1:  # the trainer's path: all-reduce (mean), clip, then the optimizer
            grads = reduce(grads)
            grads, _ = clip_by_global_norm(grads, CLIP)
        zero_opt(grads, lr)
        return loss

    @ms.jit
    def ref_step(x, y, lr):
        loss, grads = ref_grad(x, y)
        grads, _ = clip_by_global_norm(grads, CLIP)
        ref_opt(grads, lr)
        return loss

    return zero_step, ref_step, zero_opt, ref_opt, zero_params, ref_params


def state_checks(recipe, stage: int, zero_opt, ref_opt, zero_params) -> tuple[dict, dict]:
    """The gathered (layout-free) state vs the unsharded one, and its re-sharding; (full state, report)."""
    from ascend_llm.parallel.zero import ZeroAdamW

    full = zero_opt.full_state_dict()  # collective: every rank
    ref_state = {p.name: p.asnumpy() for p in ref_opt.state_parameters()}
    fresh = ZeroAdamW(zero_params, recipe.optim, stage, grad_clip=CLIP)
    fresh.load_full_state_dict(full)  # the gathered state, re-sharded: must give back the same shards
    return full, {
        "full_state_keys_match": sorted(full) == sorted(ref_state),
        "state_diff": max(float(np.abs(full[k].astype(np.float64) - ref_state[k]).max()) for k in ref_state),
        "reload_diff": max(float(np.abs(a.asnumpy() - b.asnumpy()).max())
                           for a, b in zip(fresh.state_parameters(), zero_opt.state_parameters())),
        "zero_state_bytes": zero_opt.state_bytes(),
        "unsharded_state_bytes": sum(int(p.size) * p.itemsize for p in ref_opt.state_parameters()),
        "param_sizes": [int(p.size) for p in zero_params]}


def run_stage(recipe, rank: int, world: int, stage: int, out: Path) -> None:
    """Both runs of one ZeRO stage; writes this rank's report (and rank 0 the full state for the resume check)."""
    from mindspore import Tensor

    zero_step, ref_step, zero_opt, ref_opt, zero_params, ref_params = build_steps(recipe, world, stage)
    half = ROWS // world
    zero_losses, ref_losses = [], []
    for step in range(NUM_STEPS):
        x, y = batch(step, recipe.model.vocab_size)
        lr = Tensor(lr_at(step))
        local = slice(rank * half, (rank + 1) * half)
        zero_losses.append(float(zero_step(Tensor(x[local]), Tensor(y[local]), lr).asnumpy()))
        ref_losses.append(float(ref_step(Tensor(x), Tensor(y), lr).asnumpy()))
    full, checks = state_checks(recipe, stage, zero_opt, ref_opt, zero_params)
    report = {"rank": rank, "world": world, "stage": stage, "zero_losses": zero_losses, "ref_losses": ref_losses,
              "max_param_diff": max(float(np.abs(a.asnumpy() - b.asnumpy()).max())
                                    for a, b in zip(zero_params, ref_params)), **checks}
    print(f"[zero_worker] stage {stage} rank {rank}: optimizer state {checks['zero_state_bytes']:,} bytes "
          f"(unsharded {checks['unsharded_state_bytes']:,})", flush=True)
    if rank == 0:
        np.savez(out / f"stage{stage}_state.npz", **{"param." + p.name: p.asnumpy() for p in zero_params},
                 **{"opt." + k: v for k, v in full.items()})
        report["ref_resumed_losses"] = [
            float(ref_step(Tensor(x), Tensor(y), Tensor(lr_at(i))).asnumpy())
            for i in range(NUM_STEPS, NUM_STEPS + RESUME_STEPS) for x, y in [batch(i, recipe.model.vocab_size)]]
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
