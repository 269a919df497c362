"""ZeRO pieces in one process: shard bookkeeping (pure Python) and the bf16-parameter / fp32-master update vs a
float64 NumPy AdamW (multi-process equality with the unsharded AdamW: tests/integration/test_zero_msrun.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.optim import OptimConfig


@pytest.mark.parametrize("numel, world", [(16, 2), (5, 3), (1, 4), (7, 1), (10, 4)])
def test_shards_cover_every_element_once(numel, world):
    from ascend_llm.parallel.zero import owned_range, shard_numel

    seen = np.zeros(numel, int)
    for rank in range(world):
        start, stop = owned_range(numel, world, rank)
        assert 0 <= stop - start <= shard_numel(numel, world) == -(-numel // world)
        seen[start:stop] += 1
    assert (seen == 1).all()


def adamw_reference(p, grads, lrs, cfg, decay):
    """float64 AdamW with bias correction and decoupled weight decay (Loshchilov & Hutter 2019)."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        update = (m / (1 - cfg.beta1**t)) / (np.sqrt(v / (1 - cfg.beta2**t)) + cfg.eps)
        p = p * (1 - lr * decay) - lr * update
    return p, m, v


def test_low_precision_parameters_keep_fp32_master_weights():
    # bf16 parameters are the Ascend layout; MindSpore's CPU backend has no bf16 Assign kernel, so the same
    # master-weight path is exercised here with float16 parameters (NumPy's float16 rounding as reference).
    import mindspore as ms
    from mindspore import Parameter, Tensor

    from ascend_llm.parallel.zero import ZeroAdamW

    cfg = OptimConfig(weight_decay=0.1)
    rng = np.random.default_rng(0)
    init = {"w.weight": rng.normal(size=(6, 4)).astype(np.float32), "norm.weight": np.ones(5, np.float32)}
    params = [Parameter(Tensor(v.astype(np.float16), ms.float16), name=k) for k, v in init.items()]
    optimizer = ZeroAdamW(params, cfg, stage=1)  # one process: the group has size 1
    assert optimizer.has_master and optimizer.state_bytes() == (24 + 5) * 12 + 4
    lrs = [1e-2, 2e-2, 3e-2]
    grads = [[rng.normal(size=v.shape).astype(np.float32) for v in init.values()] for _ in lrs]

    @ms.jit
    def step(g, lr):
        return optimizer(g, lr)

    for g, lr in zip(grads, lrs):
        step(ms.mutable(tuple(Tensor(x) for x in g)), Tensor(np.float32(lr)))
    for i, (name, value) in enumerate(init.items()):
        start = value.astype(np.float16).astype(np.float32)  # the master starts from the low-precision weights
        want, m, v = adamw_reference(start, [g[i] for g in grads], lrs, cfg, 0.0 if "norm" in name else 0.1)
        got = optimizer.master[i].asnumpy().reshape(value.shape)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(optimizer.exp_avg[i].asnumpy().reshape(value.shape), m, rtol=1e-5, atol=1e-7)
        # the float16 parameter is the master rounded to nearest even
        np.testing.assert_array_equal(params[i].asnumpy(), got.astype(np.float16))
    full = optimizer.full_state_dict()
    assert set(full) == {"adam_step", "adam_m.w.weight", "adam_m.norm.weight", "adam_v.w.weight",
                         "adam_v.norm.weight", "master.w.weight", "master.norm.weight"}
    assert int(full["adam_step"]) == 3


def test_bad_stage_and_bad_state_are_refused():
    import mindspore as ms
    from mindspore import Parameter, Tensor

    from ascend_llm.errors import CheckpointError, ConfigError
    from ascend_llm.parallel.zero import ZeroAdamW

    params = [Parameter(Tensor(np.zeros((2, 2), np.float32)), name="w.weight")]
    with pytest.raises(ConfigError):
        ZeroAdamW(params, OptimConfig(), stage=3)
    optimizer = ZeroAdamW(params, OptimConfig(), stage=2)
    with pytest.raises(CheckpointError):
        optimizer.load_full_state_dict({"adam_step": np.int32(1)})
    with pytest.raises(CheckpointError):
        optimizer.load_full_state_dict({"adam_step": np.int32(1), "adam_m.w.weight": np.zeros(3, np.float32),
                                        "adam_v.w.weight": np.zeros(3, np.float32)})
    assert ms.dtype_to_nptype(optimizer.step.dtype) == np.int32


def test_zero2_gradients_leave_the_backward_graph_as_the_float32_shards_the_planner_counts():
    # issue 23: ZeRO-2 reduce-scatters each micro-batch's gradients inside the compiled backward (train/step.py),
    # so the trainer accumulates float32 shards, 4 * sum ceil(n/d) bytes: the planner's accumulation buffer.
    # One process (d = 1): the shards are whole, and their sum over two micro-batches is the sum of the gradients.
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.compose import compose_recipe
    from ascend_llm.parallel.plan_memory import sharded_elements
    from ascend_llm.parallel.zero import ZeroAdamW
    from ascend_llm.precision.loss_scale import NoLossScaler
    from ascend_llm.train.build import build_training_model
    from ascend_llm.train.step import build_step_functions

    recipe = compose_recipe(["model=debug", "model.num_layers=1"])
    net = build_training_model(recipe)
    params = net.trainable_params()
    optimizer = ZeroAdamW(params, recipe.optim, stage=2, grad_clip=1.0)
    def one_process(values):
        return values

    steps = build_step_functions(net, optimizer, 1.0, one_process, NoLossScaler(), graph=True)
    rng = np.random.default_rng(0)
    batches = [tuple(Tensor(rng.integers(0, 512, size=(2, 16)).astype(np.int32)) for _ in range(2)) for _ in range(2)]
    _, _, first = steps.grads(*batches[0])
    _, _, second = steps.grads(*batches[1])
    acc = steps.accumulate(ms.mutable(first), ms.mutable(second))
    assert all(s.dtype == ms.float32 and s.ndim == 1 for s in acc)
    assert sum(s.size * 4 for s in acc) == 4 * sharded_elements(recipe.model, 1, 1, True)

    def loss(x, y):
        return ms.ops.cross_entropy(net(x).reshape(-1, 512), y.reshape(-1))

    grad_fn = ms.value_and_grad(loss, None, params)
    want = [grad_fn(*b)[1] for b in batches]
    for shard, g1, g2 in zip(acc, *want):
        np.testing.assert_allclose(shard.asnumpy(), (g1.asnumpy() + g2.asnumpy()).reshape(-1), rtol=1e-4,
                                   atol=1e-6)
