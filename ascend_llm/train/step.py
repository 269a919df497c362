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
from mindspore import amp, nn, ops

from ascend_llm.train.optim import AdamW, clip_by_global_norm


def cross_entropy_loss(logits, labels):
    """Mean token cross-entropy in fp32; logits (B, S, V), labels (B, S)."""
    vocab = logits.shape[-1]
    return ops.cross_entropy(logits.reshape(-1, vocab).astype(ms.float32), labels.reshape(-1))


def clip_to_norm(grads, norm, max_norm: float):
    """grads scaled by min(max_norm / (norm + 1e-6), 1) (`train.optim.clip_by_global_norm` with the norm
    given: computed over TP shards); max_norm <= 0 disables clipping."""
    if max_norm <= 0:
        return grads
    factor = ops.minimum(max_norm / (norm + 1e-6), 1.0)
    return tuple(g * factor.astype(g.dtype) for g in grads)


@dataclass
class StepFunctions:
    grads: Callable  # (x, y) -> (loss, grads)
    accumulate: Callable  # (acc, grads) -> acc
    apply: Callable  # (grads, loss, lr, grad_scale) -> (loss, grad_norm, finite)
    eval_loss: Callable  # (x, y) -> loss (reduced like the training loss)


def build_step_functions(model: nn.Cell, optimizer: AdamW, grad_clip: float, reduce: Callable, scaler,
                         graph: bool, loss_fn: Callable = cross_entropy_loss,
                         grad_norm: Callable | None = None) -> StepFunctions:
    """`reduce` averages a tuple of tensors over data-parallel ranks (identity on one process); with context
    parallel it also sums the CP ranks' shares (train/layout.py). `loss_fn(logits, labels)` is the loss
    (vocab-parallel with TP/CP). `grad_norm(grads)`, when given (TP: `parallel.tp.TPGradNorm`), is the global
    norm over all shards: clipping uses it, and a step is finite when it is (so every TP rank agrees)."""
    params = optimizer.params

    def forward(x, y):
        return loss_fn(model(x), y)

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
        if grad_norm is None:
            finite = scaler.adjust(amp.all_finite(grads_))
            grads_, norm = clip_by_global_norm(grads_, grad_clip)
        else:
            norm = grad_norm(grads_)
            finite = scaler.adjust(ops.isfinite(norm))
            grads_ = clip_to_norm(grads_, norm, grad_clip)
        if finite:
            optimizer(grads_, lr)
        return loss, norm, finite

    def eval_loss(x, y):
        return reduce((forward(x, y),))[0]

    wrap = ms.jit if graph else (lambda fn: fn)
    return StepFunctions(wrap(grads), wrap(accumulate), wrap(apply), wrap(eval_loss))
