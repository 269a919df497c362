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
import numpy as np
from mindspore import Tensor, amp, nn, ops

from ascend_llm.optim.adamw import AdamW, clip_by_global_norm, clip_to_norm
from ascend_llm.optim.each import add_each, scale_each
from ascend_llm.train.loss import token_cross_entropy
from ascend_llm.train.objective import LanguageModeling, Objective


def cross_entropy_loss(logits, labels):
    """Mean token cross-entropy in fp32; logits (B, S, V), labels (B, S). One fused kernel (see train/loss.py);
    every label must be a token id."""
    return token_cross_entropy(logits, labels)


def masked_cross_entropy_loss(logits, labels):
    """Mean token cross-entropy in fp32 over labels != -100 (document-masked batches: no loss across a
    document boundary, Megatron's eod_mask_loss); logits (B, S, V), labels (B, S) int32."""
    vocab = logits.shape[-1]
    return ops.cross_entropy(logits.reshape(-1, vocab).astype(ms.float32), labels.reshape(-1), ignore_index=-100)


EVAL_ROWS_CPU = 1  # rows per compiled evaluation call on CPU (see row_chunked)


def row_chunked(fn: Callable, rows: int) -> Callable:
    """`fn(*batch) -> (mean loss, *mean aux)` evaluated `rows` batch rows at a time, each value combined as the
    row-weighted mean of the chunk means (float64 on the host; equal to the whole-batch mean up to float32
    rounding, since every label counts when there are no segment ids).

    Why: graph mode on CPU keeps a buffer for every intermediate of a compiled graph for the life of the process
    (DESIGN.md), so a whole-batch evaluation graph adds a forward's worth of activations to the training
    graph's buffers (tiny, 8 x 256 tokens: ~400 MiB of peak RSS); one row at a time adds an eighth of that.
    Document-masked batches (a third (B, S) array, segment ids: loss over labels != -100 only) run whole, as do
    batches of at most `rows` rows."""

    def run(*batch):
        total = batch[0].shape[0]
        if len(batch) > 2 or total <= rows:
            return fn(*batch)
        values = None
        for start in range(0, total, rows):
            stop = min(start + rows, total)
            chunk = [float(v.asnumpy()) * (stop - start) / total for v in fn(*(b[start:stop] for b in batch))]
            values = chunk if values is None else [a + b for a, b in zip(values, chunk)]
        return tuple(Tensor(np.float32(v)) for v in values)

    return run


@dataclass
class StepFunctions:
    grads: Callable  # (*batch) -> (loss, aux, grads); aux: the objective's extra scalars (a tuple); ZeRO-2: shards
    accumulate: Callable  # (acc, grads) -> acc
    apply: Callable  # (grads, loss, lr, grad_scale) -> (loss, grad_norm, finite)
    eval_loss: Callable  # (*batch) -> (loss, *aux), reduced like the training loss
    reduce_aux: Callable  # (aux tuple) -> aux averaged over data-parallel ranks (every rank calls it)


def build_step_functions(model: nn.Cell, optimizer: AdamW, grad_clip: float, reduce: Callable, scaler,
                         graph: bool, loss_fn: Callable = cross_entropy_loss,
                         grad_norm: Callable | None = None, objective: Objective | None = None) -> StepFunctions:
    """`reduce` averages a tuple of tensors over data-parallel ranks (identity on one process); with context
    parallel it also sums the CP ranks' shares (train/layout.py). `loss_fn(logits, labels)` is the loss
    (masked for document-masked batches, vocab-parallel with TP/CP). `grad_norm(grads)`, when given (TP:
    `parallel.tp.TPGradNorm`), is the global norm over all shards: clipping uses it, and a step is finite when
    it is (so every TP rank agrees). With a ZeRO-2 optimizer (`optimizer.stage == 2`) each micro-batch's
    gradients are reduce-scattered to this rank's shards inside `grads` (accumulation keeps shards only) and
    the update works on them instead of all-reduced gradients (parallel/zero.py); with ZeRO-1 the
    optimizer slices the all-reduced gradients itself. `objective` (train/objective.py) says what is minimised:
    `objective.loss(model, *batch) -> (loss, aux)`; default: next-token cross-entropy with `loss_fn`."""
    params = optimizer.params
    objective = objective if objective is not None else LanguageModeling(loss_fn)

    def forward(*batch):
        return objective.loss(model, *batch)

    def scaled_forward(*batch):
        loss, aux = forward(*batch)
        return (scaler.scale(loss),) + tuple(aux)  # aux scalars are outputs, not differentiated (has_aux)

    def scaled_loss(*batch):
        return scaled_forward(*batch)[0]

    has_aux = bool(objective.aux_names)
    grad_fn = ms.value_and_grad(scaled_forward if has_aux else scaled_loss, None, params, has_aux=has_aux)

    sharded = getattr(optimizer, "stage", 0) == 2

    def grads(*batch):
        values, grads_ = grad_fn(*batch)
        loss, aux = (values[0], tuple(values[1:])) if has_aux else (values, ())
        if sharded:  # ZeRO-2: reduce-scatter in the backward's graph; only the float32 shards leave it and
            grads_ = optimizer.reduce_gradients(grads_)  # accumulate (1/d of the gradients, parallel/zero.py)
        return scaler.unscale(loss), aux, grads_

    def accumulate(acc, new):
        return add_each(acc, new)

    def apply(grads_, loss, lr, grad_scale):
        loss = reduce((loss * grad_scale,))[0]  # collectives chained by data: the same order on every rank
        grads_ = reduce(ops.depend(scale_each(grads_, grad_scale), loss))
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

    def apply_sharded(shards, loss, lr, grad_scale):
        """ZeRO-2: `shards` are this rank's accumulated gradient shards (reduce-scattered by `grads`); agree on
        finiteness over the group (a rank that skips alone would hang the others), clip by the global norm of
        the shards, update."""
        loss = reduce((loss * grad_scale,))[0]
        shards = scaler.unscale(ops.depend(scale_each(shards, grad_scale), loss))
        all_ok = optimizer.shards_finite(shards)  # agreed over the ZeRO group and TP (parallel/zero.py)
        finite = scaler.adjust(all_ok)
        shards, norm = optimizer.clip_shards((ops.depend(shards[0], all_ok),) + tuple(shards[1:]))
        if finite:
            optimizer.apply_shards(shards, lr)
        return loss, norm, finite

    def eval_loss(*batch):
        loss, aux = forward(*batch)
        return reduce((loss,) + tuple(aux))

    def reduce_aux(aux):
        return reduce(tuple(aux))

    wrap = ms.jit if graph else (lambda fn: fn)
    update = apply_sharded if getattr(optimizer, "stage", 0) == 2 else apply
    evaluate = wrap(eval_loss)
    if graph and ms.get_context("device_target") == "CPU":
        evaluate = row_chunked(evaluate, EVAL_ROWS_CPU)
    return StepFunctions(wrap(grads), wrap(accumulate), wrap(update), evaluate, wrap(reduce_aux))
