"""KV-head replication and ZeRO with tensor/context parallel, under real msrun on CPU (MCCL), fp32.

1. tp2 with one KV head (replicated on both TP ranks; workers/tpz_worker.py, run in the 2-worker msrun job of the
   `layout_jobs` fixture) and per-head q/k norms (their
   replicated weights' gradients are summed over TP), with and without sequence parallel: one forward + backward of
   the debug-size model (vocabulary 511) equals one process of the same seeded model: loss and logits within 1e-5,
   every gradient (gathered to the unsharded names and shapes) within rtol 1e-4, the global gradient norm within
   rtol 1e-5; both replicas of wk/wv get the same gradient; gathering the shards gives the full seeded init and
   sharding it gives the shards.
2. Through the trainer (`debug=smoke model.num_kv_heads=1`, trainer_runs.TPZ; runs of the msrun trainer jobs of
   trainer_runs.py), 4 workers, `parallel=tp2_dp2 parallel.zero_stage=2`:
   resumed from the one-process run's step-2 checkpoint (one process -> ZeRO-2 x TP x DP), steps 3..4 give the one-
   process losses and gradient norms within 1e-5; its step-4 checkpoint has the one-process names and shapes (model
   and AdamW moments: layout-free) and values close to it; resumed in one process (ZeRO-2 x TP x DP -> one process),
   steps 5..6 give the one-process losses within 1e-5.
3. 2 workers, `parallel=cp2 parallel.zero_stage=2` (ZeRO over the CP group, dp=1), resumed from the one-process
   run's step-2 checkpoint (one process -> ZeRO-2 x CP: the AdamW moments sharded over the CP ranks on load):
   steps 3..4 give the one-process losses and gradient norms, and its step-4 checkpoint the one-process names,
   shapes and values (training from scratch under cp2: test_tpcp_train_msrun's cp2_dp2 and test_preference_msrun's
   dpo_cp2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tpz_worker import VARIANTS, VOCAB, batch, model_config
from trainer_runs import TPZ_STEPS, checkpoint

from tests.conftest import records_by_step

# one pytest-xdist worker runs every test of a shared msrun job's group (tests/integration/conftest.py): the first
# test here reads the layout job, the others the trainer job
TRAINER_JOBS = pytest.mark.xdist_group("msrun_jobs")

ATOL = 1e-5


@pytest.mark.xdist_group("layout_jobs")
def test_tp2_with_one_kv_head_matches_one_process(layout_jobs):
    import mindspore as ms
    from mindspore import Tensor, ops

    from ascend_llm.models.llama import build_model

    got = layout_jobs["kv1"]
    model = build_model(model_config(), seed=0)
    params = model.trainable_params()
    tokens, labels = batch()

    def forward(x, y):
        logits = model(x)
        return ops.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)), logits

    (loss, logits), grads = ms.value_and_grad(forward, None, params, has_aux=True)(Tensor(tokens), Tensor(labels))
    grads = {p.name: g.asnumpy() for p, g in zip(params, grads)}
    want_norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
    for variant in VARIANTS:
        assert list(got[f"{variant}/replicated"]) == [f"layers.{i}.attention.{w}.weight" for i in (0, 1)
                                                      for w in ("wk", "wv")]
        assert got[f"{variant}/state/gather_err"] == 0 and got[f"{variant}/state/shard_err"] == 0
        assert got[f"{variant}/replica_err"] == 0  # both replicas of a KV head get the same summed gradient
        np.testing.assert_allclose(got[f"{variant}/loss"], loss.asnumpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(got[f"{variant}/logits"], logits.asnumpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(got[f"{variant}/grad_norm"], want_norm, rtol=1e-5)
        assert sorted(k.split("/grad/")[1] for k in got if k.startswith(f"{variant}/grad/")) == sorted(grads)
        for name, want in grads.items():
            np.testing.assert_allclose(got[f"{variant}/grad/{name}"], want, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{variant} gradient of {name}")


# Parameters and AdamW moments after the steps, vs one process: measured worst 9.9e-7 (cp2) and 1.2e-7 (tp2_dp2).
PARAM_ATOL = 1e-5


def check_run(run_dir: Path, one: Path, steps: list[int]) -> None:
    """Losses and gradient norms of `steps` within 1e-5 of one process; the last step's checkpoint has its names,
    shapes and dtypes (model and optimizer: layout-free) and values within PARAM_ATOL."""
    from safetensors.numpy import load_file

    got, want = records_by_step(run_dir), records_by_step(one)
    assert sorted(got) == steps
    assert not any("val_loss" in r for r in [*got.values(), *want.values()])  # train.val_batches=0: no validation
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([got[s][key] for s in steps], [want[s][key] for s in steps], rtol=0,
                                   atol=ATOL, err_msg=key)
    for part in ("model", "optimizer"):
        mine, ref = (load_file(str(checkpoint(d, steps[-1]) / f"{part}.safetensors")) for d in (run_dir, one))
        assert mine.keys() == ref.keys() and len(ref) > 2, part
        print(f"{part}: max |parallel - one process| = {max(np.abs(mine[n] - ref[n]).max() for n in ref):.2e}")
        for name in ref:
            assert mine[name].shape == ref[name].shape and mine[name].dtype == ref[name].dtype, name
            np.testing.assert_allclose(mine[name], ref[name], rtol=0, atol=PARAM_ATOL, err_msg=f"{part}:{name}")


@TRAINER_JOBS
def test_zero2_with_tp2_dp2_resumes_both_ways_like_one_process(trainer_jobs, one_process):
    _, one, overrides = trainer_jobs.reference("tpz")
    # resumed from the reference's step 2 under ZeRO-2 x TP x DP (4 workers), 4 steps; steps 1-5 are warmup
    # (debug=smoke: optim.warmup_steps=5): their LR does not depend on train.num_steps
    tpz = trainer_jobs.run_dir("tp2_dp2_zero2")
    check_run(tpz, one, [3, 4])
    resumed = one_process([*overrides, f"train.resume={checkpoint(tpz, 4)}"])[0]
    assert resumed["start_step"] == 4 and len(resumed["losses"]) == TPZ_STEPS - 4
    np.testing.assert_allclose(resumed["losses"], [records_by_step(one)[s]["loss"] for s in (5, 6)], rtol=0,
                               atol=ATOL)


@TRAINER_JOBS
def test_one_process_checkpoint_resumes_under_zero2_over_the_context_parallel_group(trainer_jobs):
    """cp2 with dp=1: ZeRO shards over the 2 CP ranks (each holds a share of one loss: gradients summed, scale
    1/dp = 1), from the one-process step-2 checkpoint."""
    _, one, _ = trainer_jobs.reference("tpz")
    check_run(trainer_jobs.run_dir("cp2_zero2"), one, [3, 4])
