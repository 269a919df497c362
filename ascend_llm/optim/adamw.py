"""AdamW (decoupled weight decay, bias-corrected) as a MindSpore cell, plus global-norm clipping.

MindSpore's `mint.optim.AdamW` has no CPU kernel in 2.10 and `nn.AdamWeightDecay` omits bias correction. The
update runs through the fused `ops.AdamWeightDecay` kernel (CPU and Ascend: one in-place pass over param, m, v
per parameter, instead of ~15 graph ops and their buffers), with the bias correction folded into its scalar
inputs (see `fused_scalars`). Parameters that are not float32 take the same formula written with plain ops.
Weight decay skips norm weights and biases. Moments are fp32 Parameters named adam_m.<param>, adam_v.<param>.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.optim import OptimConfig
from ascend_llm.optim.each import each, scale_each, square_sum

NO_DECAY_SUFFIXES = ("norm.weight", ".bias", "logit_scale", "logit_bias")


def decays(name: str) -> bool:
    """True unless `name` is a norm weight (`...norm.weight`), a bias, or a contrastive head's learnable
    temperature / bias (`logit_scale`, `logit_bias`: decaying the temperature pulls it to 0 and flattens the
    softmax; OpenCLIP's training script exempts them as well): those get no weight decay."""
    return not name.endswith(NO_DECAY_SUFFIXES)


def fused_scalars(lr, bias1, bias2, eps: float, weight_decay: float):
    """(lr', eps', decay') such that the kernel's un-corrected update equals bias-corrected AdamW exactly.

    AdamW (Loshchilov & Hutter; torch.optim.AdamW's documented form):
        w <- w - lr * wd * w - lr * (m / b1) / (sqrt(v / b2) + eps),   b1 = 1 - beta1^t, b2 = 1 - beta2^t.
    `ops.AdamWeightDecay` computes w <- w - lr' * (m / (sqrt(v) + eps') + decay' * w). Multiplying numerator and
    denominator by sqrt(b2): lr' = lr * sqrt(b2) / b1, eps' = eps * sqrt(b2), decay' = wd * lr / lr'.
    """
    root2 = ops.sqrt(bias2)
    lr_t = lr * root2 / bias1
    return lr_t, eps * root2, weight_decay * bias1 / root2


class AdamW(nn.Cell):
    """AdamW over `params` with `cfg`'s betas, eps and weight decay (Loshchilov & Hutter 2019; the update of
    torch.optim.AdamW). Moments are float32 Parameters `adam_m.<name>` / `adam_v.<name>`, the step an int32
    `adam_step`; call `optimizer(grads, lr)` inside the compiled step."""

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
        self.fused = tuple(p.dtype == mstype.float32 for p in params)
        self.adam = ops.AdamWeightDecay()

    def state_parameters(self) -> list[Parameter]:
        """[adam_step, every adam_m.*, every adam_v.*]: the optimizer state a checkpoint saves."""
        return [self.step, *self.exp_avg, *self.exp_avg_sq]

    def construct(self, grads, lr):
        """grads: tuple of tensors shaped like `params` (any float dtype); lr: float32 scalar Tensor. Updates params
        and moments in place and returns the new step count (int32 scalar)."""
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(mstype.float32)
        bias1 = 1.0 - ops.pow(self.beta1, t)
        bias2 = 1.0 - ops.pow(self.beta2, t)
        # the fused kernel's scalars, computed once; each parameter's decay' is its weight decay times decay_ratio
        lr_t, eps_t, decay_ratio = fused_scalars(lr, bias1, bias2, self.eps, 1.0)
        fused = (lr_t, eps_t, decay_ratio, ops.scalar_to_tensor(self.beta1, mstype.float32),
                 ops.scalar_to_tensor(self.beta2, mstype.float32))
        done = each(ops.partial(_adamw_one, self.adam, fused, (self.beta1, self.beta2, self.eps), lr, bias1, bias2),
                    self.fused, self.weight_decay, self.params, self.exp_avg, self.exp_avg_sq, grads)
        return ops.depend(step, done)


def _adamw_one(adam, fused_scalars_, betas, lr, bias1, bias2, fused, weight_decay, param, m, v, grad):
    """One parameter's AdamW update (mapped over the parameters by AdamW.construct)."""
    grad = grad.astype(mstype.float32)
    if fused:
        lr_t, eps_t, decay_ratio, beta1, beta2 = fused_scalars_
        return adam(param, m, v, lr_t, beta1, beta2, eps_t, decay_ratio * weight_decay, grad)
    return ops.assign(param, adamw_update(betas, lr, bias1, bias2, weight_decay, param, m, v, grad).astype(param.dtype))


def adamw_update(betas, lr, bias1, bias2, weight_decay, current, m, v, grad):
    """AdamW written with plain ops (the formula in `fused_scalars`' doc): assigns the moments m and v (float32
    Parameters) and returns current * (1 - lr * wd) - lr * (m / bias1) / (sqrt(v / bias2) + eps), the new value of
    the parameter (or of its ZeRO shard). betas = (beta1, beta2, eps); grad float32, shaped like m."""
    beta1, beta2, eps = betas
    m_new = m * beta1 + grad * (1.0 - beta1)
    v_new = v * beta2 + grad * grad * (1.0 - beta2)
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    update = (m_new / bias1) / (ops.sqrt(v_new / bias2) + eps)
    return current * (1.0 - lr * weight_decay) - lr * update


def global_norm(grads):
    """L2 norm of all of `grads` together, float32 scalar."""
    return ops.sqrt(square_sum(grads))


def clip_to_norm(grads, norm, max_norm: float):
    """grads scaled by min(max_norm / (norm + 1e-6), 1), the global norm `norm` given (e.g. computed over TP or
    ZeRO shards); max_norm <= 0 disables clipping. The form of torch.nn.utils.clip_grad_norm_."""
    if max_norm <= 0:
        return grads
    return scale_each(grads, ops.minimum(max_norm / (norm + 1e-6), 1.0))


def clip_by_global_norm(grads, max_norm: float):
    """Scale grads so their global L2 norm is at most max_norm (0 disables). Returns (grads, norm before)."""
    norm = global_norm(grads)
    return clip_to_norm(grads, norm, max_norm), norm
