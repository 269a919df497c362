"""The compiled pieces of a training step: micro-batch loss+grads, gradient accumulation, and the update.

Split into three functions so gradient accumulation is a plain Python loop over one compiled graph; in
graph mode each is wrapped in `ms.jit`, in pynative mode they run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mindspore as ms
from mindspore import nn, ops

from ascend_llm.train.optim import AdamW, clip_by_global_norm


def cross_entropy_loss(logits, labels):
    """Mean token cross-entropy in fp32; logits (B, S, V), labels (B, S)."""
    vocab = logits.shape[-1]
    return ops.cross_entropy(logits.reshape(-1, vocab).astype(ms.float32), labels.reshape(-1))


@dataclass
class StepFunctions:
    grads: Callable  # (x, y) -> (loss, grads)
    accumulate: Callable  # (acc, grads) -> acc
    apply: Callable  # (grads, loss, lr, grad_scale) -> (loss, grad_norm)
    eval_loss: Callable  # (x, y) -> loss


def build_step_functions(model: nn.Cell, optimizer: AdamW, grad_clip: float, reduce: Callable,
                         graph: bool) -> StepFunctions:
    """`reduce` averages a tuple of tensors over data-parallel ranks (identity on one process)."""
    params = optimizer.params

    def forward(x, y):
        return cross_entropy_loss(model(x), y)

    grad_fn = ms.value_and_grad(forward, None, params)

    def grads(x, y):
        return grad_fn(x, y)

    def accumulate(acc, new):
        return tuple(a + b for a, b in zip(acc, new))

    def apply(grads_, loss, lr, grad_scale):
        grads_ = reduce(tuple(g * grad_scale for g in grads_))
        loss = reduce((loss * grad_scale,))[0]
        grads_, norm = clip_by_global_norm(grads_, grad_clip)
        optimizer(grads_, lr)
        return loss, norm

    wrap = ms.jit if graph else (lambda fn: fn)
    return StepFunctions(wrap(grads), wrap(accumulate), wrap(apply), wrap(forward))
