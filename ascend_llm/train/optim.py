"""AdamW (decoupled weight decay, bias-corrected) as a MindSpore cell, plus global-norm clipping.

MindSpore's `mint.optim.AdamW` has no CPU kernel in 2.10 and `nn.AdamWeightDecay` omits bias correction,
so the update is written here with plain ops; it runs inside the jitted step on CPU and Ascend alike.
Weight decay skips norm weights and biases. Moments are fp32 Parameters named adam_m.<param>, adam_v.<param>.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.optim import OptimConfig


def decays(name: str) -> bool:
    return not (name.endswith("norm.weight") or name.endswith(".bias"))


class AdamW(nn.Cell):
    def __init__(self, params: list[Parameter], cfg: OptimConfig):
        super().__init__(auto_prefix=False)
        self.params = tuple(params)
        self.beta1, self.beta2, self.eps = cfg.beta1, cfg.beta2, cfg.eps
        self.weight_decay = tuple(cfg.weight_decay if decays(p.name) else 0.0 for p in params)
        self.exp_avg = ParameterTuple(
            Parameter(Tensor(np.zeros(p.shape, np.float32)), name="adam_m." + p.name, requires_grad=False)
            for p in params)
        self.exp_avg_sq = ParameterTuple(
            Parameter(Tensor(np.zeros(p.shape, np.float32)), name="adam_v." + p.name, requires_grad=False)
            for p in params)
        self.step = Parameter(Tensor(0, mstype.int32), name="adam_step", requires_grad=False)

    def state_parameters(self) -> list[Parameter]:
        return [self.step, *self.exp_avg, *self.exp_avg_sq]

    def construct(self, grads, lr):
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(mstype.float32)
        bias1 = 1.0 - ops.pow(self.beta1, t)
        bias2 = 1.0 - ops.pow(self.beta2, t)
        for i in range(len(self.params)):
            param, grad = self.params[i], grads[i].astype(mstype.float32)
            m = self.exp_avg[i] * self.beta1 + grad * (1.0 - self.beta1)
            v = self.exp_avg_sq[i] * self.beta2 + grad * grad * (1.0 - self.beta2)
            ops.assign(self.exp_avg[i], m)
            ops.assign(self.exp_avg_sq[i], v)
            update = (m / bias1) / (ops.sqrt(v / bias2) + self.eps)
            new = param * (1.0 - lr * self.weight_decay[i]) - lr * update
            ops.assign(param, new.astype(param.dtype))
        return step


def global_norm(grads):
    total = 0.0
    for g in grads:
        g32 = g.astype(mstype.float32)
        total = total + (g32 * g32).sum()
    return ops.sqrt(total)


def clip_by_global_norm(grads, max_norm: float):
    """Scale grads so their global L2 norm is at most max_norm (0 disables). Returns (grads, norm before)."""
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    factor = ops.minimum(max_norm / (norm + 1e-6), 1.0)
    return tuple(g * factor.astype(g.dtype) for g in grads), norm
