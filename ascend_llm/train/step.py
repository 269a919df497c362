"""The compiled pieces of a training step: micro-batch loss+grads, gradient accumulation, and the update.

Split into three functions so gradient accumulation is a plain Python loop over one compiled graph; in
graph mode each is wrapped in `ms.jit`, in pynative mode they run eagerly. The loss scaler (fp16) scales
the loss before autodiff and unscales the accumulated, all-reduced gradients; a step whose gradients are
not finite changes no parameter (all ranks agree, since they test the same reduced gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mindspore as ms
from mindspore import amp, nn

from ascend_llm.train.loss import token_cross_entropy
from ascend_llm.train.optim import AdamW, clip_by_global_norm


def cross_entropy_loss(logits, labels):
    """Mean token cross-entropy in fp32; logits (B, S, V), labels (B, S). One fused kernel (see train/loss.py)."""
    return token_cross_entropy(logits, labels)


@dataclass
class StepFunctions:
    grads: Callable  # (x, y) -> (loss, grads)
    accumulate: Callable  # (acc, grads) -> acc
    apply: Callable  # (grads, loss, lr, grad_scale) -> (loss, grad_norm, finite)
    eval_loss: Callable  # (x, y) -> loss


def build_step_functions(model: nn.Cell, optimizer: AdamW, grad_clip: float, reduce: Callable, scaler,
                         graph: bool) -> StepFunctions:
    """`reduce` averages a tuple of tensors over data-parallel ranks (identity on one process)."""
    params = optimizer.params

    def forward(x, y):
        return cross_entropy_loss(model(x), y)

    def scaled_forward(x, y):
        return scaler.scale(forward(x, y))

    grad_fn = ms.value_and_grad(scaled_forward, None, params)

    def grads(x, y):
        loss, grads_ = grad_fn(x, y)
        return scaler.unscale(loss), grads_

    def accumulate(acc, new):
        return tuple(a + b for a, b in zip(acc, new))

    def apply(grads_, loss, lr, grad_scale):
        grads_ = reduce(tuple(g * grad_scale for g in grads_))
        loss = reduce((loss * grad_scale,))[0]
        grads_ = scaler.unscale(grads_)
        finite = scaler.adjust(amp.all_finite(grads_))
        grads_, norm = clip_by_global_norm(grads_, grad_clip)
        if finite:
            optimizer(grads_, lr)
        return loss, norm, finite

    wrap = ms.jit if graph else (lambda fn: fn)
    return StepFunctions(wrap(grads), wrap(accumulate), wrap(apply), wrap(forward))
