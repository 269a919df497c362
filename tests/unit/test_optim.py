"""AdamW, clipping and the LR schedule against independent float64 references from the published formulas."""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from ascend_llm.config.optim import OptimConfig
from ascend_llm.optim.adamw import AdamW, clip_by_global_norm
from ascend_llm.train.schedule import lr_at


def adamw_reference(p, grads, lr, cfg, decay):
    """Loshchilov & Hutter AdamW with bias correction (as torch.optim.AdamW documents it), float64."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * (cfg.weight_decay if decay else 0.0))
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        p = p - lr * (m / (1 - cfg.beta1 ** t)) / (np.sqrt(v / (1 - cfg.beta2 ** t)) + cfg.eps)
    return p


def test_adamw_matches_reference_and_skips_decay_for_norms_biases_and_contrastive_temperature():
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    rng = np.random.default_rng(0)
    init = {"layer.w1.weight": rng.normal(size=(4, 3)), "layer.ffn_norm.weight": rng.normal(size=3),
            "layer.wq.bias": rng.normal(size=4), "logit_scale": rng.normal(size=1), "logit_bias": rng.normal(size=1)}
    params = [Parameter(Tensor(v.astype(np.float32)), name=n) for n, v in init.items()]
    opt = AdamW(params, cfg)

    @ms.jit
    def step(g, lr):
        return opt(g, lr)

    grads = [[rng.normal(size=v.shape) for v in init.values()] for _ in range(5)]
    for g in grads:
        step(tuple(Tensor(x.astype(np.float32)) for x in g), Tensor(np.float32(cfg.lr)))
    for i, (name, value) in enumerate(init.items()):
        ref = adamw_reference(value, [g[i] for g in grads], cfg.lr, cfg, decay=name.endswith("w1.weight"))
        np.testing.assert_allclose(params[i].asnumpy(), ref, rtol=2e-5, atol=2e-6, err_msg=name)
    assert int(opt.step.asnumpy()) == 5


def test_clip_by_global_norm():
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(5, 5)) * 3, rng.normal(size=7)]
    norm = math.sqrt(sum((g ** 2).sum() for g in grads))
    clipped, got_norm = clip_by_global_norm(tuple(Tensor(g.astype(np.float32)) for g in grads), 1.0)
    assert abs(float(got_norm.asnumpy()) - norm) < 1e-4 * norm
    new_norm = math.sqrt(sum((c.asnumpy().astype(np.float64) ** 2).sum() for c in clipped))
    assert abs(new_norm - 1.0) < 1e-5
    np.testing.assert_allclose(clipped[0].asnumpy(), grads[0] / norm, rtol=1e-4, atol=1e-7)
    same, _ = clip_by_global_norm(tuple(Tensor(g.astype(np.float32)) for g in grads), 10 * norm)
    np.testing.assert_allclose(same[1].asnumpy(), grads[1], rtol=1e-6)


def test_warmup_then_cosine_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == 0.1 and lr_at(9, cfg, 110) == 1.0
    assert abs(lr_at(60, cfg, 110) - (0.1 + 0.9 * 0.5)) < 1e-12  # halfway through the cosine
    assert abs(lr_at(110, cfg, 110) - 0.1) < 1e-12 and abs(lr_at(500, cfg, 110) - 0.1) < 1e-12
    values = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_adamw_non_float32_parameter_takes_the_plain_path_with_the_same_formula():
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    rng = np.random.default_rng(2)
    init = {"a.w1.weight": rng.normal(size=(3, 4)), "b.w2.weight": rng.normal(size=(4,))}
    params = [Parameter(Tensor(init["a.w1.weight"].astype(np.float32)), name="a.w1.weight"),
              Parameter(Tensor(init["b.w2.weight"].astype(np.float16)), name="b.w2.weight")]
    opt = AdamW(params, cfg)
    assert opt.fused == (True, False)

    @ms.jit
    def step(g, lr):
        return opt(g, lr)

    grads = [[rng.normal(size=v.shape) for v in init.values()] for _ in range(3)]
    for g in grads:
        step((Tensor(g[0].astype(np.float32)), Tensor(g[1].astype(np.float16))), Tensor(np.float32(cfg.lr)))
    ref32 = adamw_reference(init["a.w1.weight"], [g[0] for g in grads], cfg.lr, cfg, decay=True)
    np.testing.assert_allclose(params[0].asnumpy(), ref32, rtol=2e-5, atol=2e-6)
    ref16 = adamw_reference(init["b.w2.weight"].astype(np.float16).astype(np.float64),
                            [g[1].astype(np.float16).astype(np.float64) for g in grads], cfg.lr, cfg, decay=True)
    np.testing.assert_allclose(params[1].asnumpy().astype(np.float64), ref16, rtol=2e-3, atol=2e-3)
