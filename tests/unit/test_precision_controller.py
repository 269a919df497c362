"""The dynamic precision controller: a layer fed values that overflow is promoted fp8 -> bf16 -> fp32 after K
bad steps, demoted after M clean steps, computes in its new rung without recompiling, and its state
survives a checkpoint round trip."""

from __future__ import annotations

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
from mindspore import Tensor, nn

from ascend_llm.config.precision import DynamicConfig, Fp8Config, PrecisionConfig
from ascend_llm.precision import apply_fp8, build_controller

F32 = np.float32


class Pair(nn.Cell):
    def __init__(self):
        super().__init__()
        self.a = nn.Dense(32, 32, has_bias=False)
        self.b = nn.Dense(32, 16, has_bias=False)

    def construct(self, x):
        return self.b(self.a(x))


def build(seed: int = 0, kernels: str = "auto", **dynamic):
    ms.set_seed(seed)
    net = Pair()
    rng = np.random.default_rng(seed)
    for p in net.trainable_params():
        p.set_data(Tensor((rng.standard_normal(p.shape) * 0.1).astype(F32)))
    settings = dict(enabled=True, overflow_threshold=0.01, underflow_threshold=0.2, patience=2, clean_steps=3)
    settings.update(dynamic)
    cfg = PrecisionConfig(name="fp8_dynamic", cpu_kernels=kernels,
                          fp8=Fp8Config(enabled=True, amax_history_len=4, skip=[]),
                          dynamic=DynamicConfig(**settings))
    cfg.validate()
    apply_fp8(net, cfg)
    controller = build_controller(net, cfg)

    def loss(x):
        return (net(x) ** 2).mean()

    grad_fn = ms.jit(ms.value_and_grad(loss, None, net.trainable_params()))
    return net, controller, grad_fn


X = np.random.default_rng(1).standard_normal((64, 32)).astype(F32)
# Magnitudes per step: a steady start, a run of 16x jumps (each overflows the delayed scale), then steady.
SCHEDULE = [1.0, 1.0, 16.0, 256.0, 4096.0, 65536.0, 65536.0, 65536.0, 65536.0, 65536.0, 65536.0, 65536.0]


def run(net, controller, grad_fn, schedule, start=0):
    log = []
    for i, magnitude in enumerate(schedule, start=start + 1):
        grad_fn(Tensor(X * F32(magnitude)))
        log.append((controller.step(i), dict(controller.levels)))
    return log


def test_overflow_promotes_clean_steps_demote_and_the_state_survives_checkpoint_and_resume():
    """One run of SCHEDULE: its state after step 7 loaded into a second net (other seed, same weights) makes
    steps 8..12 identical there; the whole run's decisions are the promotions and demotions (one net and one
    compile fewer than two tests)."""
    net, controller, grad_fn = build()
    log = run(net, controller, grad_fn, SCHEDULE[:7])
    state = controller.state_dict()
    weights = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    assert "a.fp8_x_history" in state and "precision.controller.a" in state

    net2, controller2, grad_fn2 = build(seed=5)
    for p in net2.trainable_params():
        p.set_data(Tensor(weights[p.name]))
    controller2.load_state_dict(state)
    assert controller2.levels == controller.levels and controller2.clean_streak == controller.clean_streak
    rest = SCHEDULE[7:]
    resumed = run(net2, controller2, grad_fn2, rest, start=7)
    log += run(net, controller, grad_fn, rest, start=7)
    assert resumed == log[7:]
    np.testing.assert_array_equal(net2.b.fp8_g_history.asnumpy(), net.b.fp8_g_history.asnumpy())

    decisions = [d for step, _ in log for d in step]
    a_moves = [(d["step"], d["action"], d["from"], d["to"]) for d in decisions if d["layer"] == "a"]
    # bad at steps 3, 4 -> bf16; bad at 5, 6 -> fp32; clean 7, 8, 9 -> bf16; clean 10, 11, 12 -> fp8
    assert a_moves == [(4, "promote", "fp8", "bf16"), (6, "promote", "bf16", "fp32"),
                       (9, "demote", "fp32", "bf16"), (12, "demote", "bf16", "fp8")]
    assert "x overflow" in decisions[0]["reason"] and "2 consecutive steps" in decisions[0]["reason"]
    assert float(net.a.fp8_level.asnumpy()) == 0.0
    metrics = controller.metrics()
    assert metrics["fp8/a/level"] == "fp8" and metrics["fp8/num_layers_fp8"] == 2
    assert metrics["fp8/a/x_amax"] == F32(np.abs(X * F32(65536.0)).max())


@pytest.mark.parametrize("kernels", ["auto", "ops"])  # fused CPU kernel selects the rung itself; ops: where
def test_promoted_layer_computes_in_its_rung(kernels):
    net, controller, grad_fn = build(kernels=kernels, max_level="bf16")
    run(net, controller, grad_fn, SCHEDULE[:6])
    assert controller.levels["a"] == 1 and float(net.a.fp8_level.asnumpy()) == 1.0  # capped at bf16
    w = net.a.weight.asnumpy()
    bf16 = ml_dtypes.bfloat16
    ref = X.astype(bf16).astype(np.float64) @ w.astype(bf16).astype(np.float64).T
    np.testing.assert_allclose(net.a(Tensor(X)).asnumpy(), ref, rtol=1e-5, atol=1e-6)


def test_underflow_counts_as_bad():
    net, controller, grad_fn = build(patience=1)
    x = X.copy()
    x[:, :16] *= F32(1e-12)  # half the values flush to zero at the scale the large ones set
    grad_fn(Tensor(x))
    decisions = controller.step(1)
    assert decisions and decisions[0]["layer"] == "a" and "x underflow" in decisions[0]["reason"]


def test_without_dynamic_the_controller_only_reports():
    net, controller, grad_fn = build(enabled=False)
    run(net, controller, grad_fn, SCHEDULE[:5])
    assert controller.decisions == [] and controller.levels == {"a": 0, "b": 0}
    assert controller.metrics()["fp8/max_overflow"] > 0.01
