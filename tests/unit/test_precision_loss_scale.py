"""Dynamic loss scaling in a compiled fp16 train step written to the trainer contract: an injected overflow
skips the step (no parameter changes), lowers the scale and is counted; the scale grows after a window of
finite steps and survives a checkpoint round trip."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, amp, nn, ops

from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.precision import apply_precision, build_loss_scaler
from ascend_llm.precision.loss_scale import NoLossScaler

F32 = np.float32


class Mlp(nn.Cell):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Dense(16, 32)
        self.w2 = nn.Dense(32, 4)

    def construct(self, x):
        return self.w2(ops.relu(self.w1(x)))


def fp16_cfg(**kw) -> PrecisionConfig:
    cfg = PrecisionConfig(name="fp16", compute_dtype="float16", loss_scale="dynamic", loss_scale_value=1024.0,
                          loss_scale_window=2, **kw)
    cfg.validate()
    return cfg


def build_step(net: nn.Cell, scaler):
    params = net.trainable_params()
    optimizer = nn.SGD(params, learning_rate=0.01)

    def forward(x, y):
        return scaler.scale(ops.mse_loss(net(x), y))

    grad_fn = ms.value_and_grad(forward, None, params)

    @ms.jit
    def step(x, y):
        loss, grads = grad_fn(x, y)
        grads = scaler.unscale(grads)
        finite = scaler.adjust(amp.all_finite(grads))
        if finite:
            optimizer(grads)
        return scaler.unscale(loss), finite

    return step


def snapshot(net: nn.Cell) -> list[np.ndarray]:
    return [p.asnumpy().copy() for p in net.trainable_params()]


def test_injected_overflow_skips_the_step_and_lowers_the_scale():
    cfg = fp16_cfg()
    net = apply_precision(Mlp(), cfg)
    scaler = build_loss_scaler(cfg)
    step = build_step(net, scaler)
    rng = np.random.default_rng(0)
    x, y = Tensor(rng.standard_normal((8, 16)).astype(F32)), Tensor(rng.standard_normal((8, 4)).astype(F32))

    before = snapshot(net)
    loss, finite = step(x, y)
    assert bool(finite.asnumpy()) and np.isfinite(loss.asnumpy())
    assert any(not np.array_equal(a, b) for a, b in zip(before, snapshot(net)))
    assert scaler.step(1) is None and scaler.value == 1024.0

    before = snapshot(net)
    _, finite = step(x * 1e4, y)  # fp16 backward overflows at this loss scale
    assert not bool(finite.asnumpy())
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(net)))  # no parameter changed
    event = scaler.step(2)
    assert event == {"step": 2, "event": "overflow_skipped", "loss_scale": 512.0, "skipped_steps": 1}

    step(x, y)
    step(x, y)  # two finite steps in a row (window 2): the scale doubles again
    assert scaler.value == 1024.0 and scaler.step(4) is None
    assert scaler.metrics() == {"loss_scale": 1024.0, "loss_scale_skipped_steps": 1}


def test_scaler_state_round_trips_through_a_checkpoint():
    cfg = fp16_cfg()
    net = apply_precision(Mlp(), cfg)
    scaler = build_loss_scaler(cfg)
    step = build_step(net, scaler)
    x, y = Tensor(np.ones((4, 16), F32)), Tensor(np.zeros((4, 4), F32))
    step(x * 1e5, y)
    step(x, y)
    state = scaler.state_dict()
    assert set(state) == {"loss_scale.value", "loss_scale.counter", "loss_scale.skipped_steps"}

    restored = build_loss_scaler(cfg)
    restored.load_state_dict(state)
    assert restored.value == scaler.value == 512.0
    assert int(restored.inner.counter.asnumpy()) == int(scaler.inner.counter.asnumpy()) == 1
    assert restored.step(3) is None  # overflows before the checkpoint are not reported again
    assert restored.metrics()["loss_scale_skipped_steps"] == 1


def test_float32_recipes_get_an_identity_scaler():
    scaler = build_loss_scaler(PrecisionConfig())
    assert isinstance(scaler, NoLossScaler) and not scaler.enabled
    net = Mlp()
    step = build_step(net, scaler)
    loss, finite = step(Tensor(np.ones((2, 16), F32)), Tensor(np.zeros((2, 4), F32)))
    assert bool(finite.asnumpy()) and scaler.state_dict() == {} and scaler.step(1) is None
