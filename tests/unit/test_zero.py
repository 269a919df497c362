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
