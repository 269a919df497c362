"""Loss scaling for float16 training, around `mindspore.amp.DynamicLossScaler` / `StaticLossScaler`.

Usable inside an `ms.jit` train step (the scalers keep their state in Parameters updated with ops.assign):

    loss, grads = value_and_grad(lambda x, y: scaler.scale(loss_fn(x, y)))(x, y)   # scaled loss
    loss = scaler.unscale(loss)
    grads = scaler.unscale(grads)
    finite = scaler.adjust(all_finite(grads))     # grows/shrinks the scale, counts skipped steps
    if finite:                                    # an overflow step changes no parameter
        optimizer(grads)

After the step, `scaler.step(step)` (plain Python) logs and returns an event when that step overflowed.
MindSpore's TrainOneStepWithLossScaleCell fails on CPU (it uses an Ascend float-status op), hence the step
written out as above.
"""

from __future__ import annotations

import logging

import numpy as np
from mindspore import Parameter, Tensor, amp, ops
from mindspore import dtype as mstype

from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.errors import CheckpointError

logger = logging.getLogger("ascend_llm.precision")


class NoLossScaler:
    """Identity scaler for float32/bfloat16/FP8 recipes: same interface, nothing to scale or save."""

    enabled = False

    def scale(self, loss):
        """Returns `loss` unchanged."""
        return loss

    def unscale(self, grads):
        """Returns `grads` (a Tensor or tuple of Tensors) unchanged."""
        return grads

    def adjust(self, grads_finite):
        """Returns `grads_finite` (scalar bool Tensor) unchanged: nothing to grow or shrink."""
        return grads_finite

    def step(self, step: int) -> dict | None:
        """Always None: without a loss scale no step is skipped by the scaler."""
        return None

    def metrics(self) -> dict:
        """Always {}."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Always {}: nothing to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Ignores `state`: nothing to restore."""
        return None


class LossScaler:
    """Dynamic (grow by `factor` after `window` finite steps, shrink by `factor` on overflow) or static."""

    enabled = True
    KEYS = ("loss_scale.value", "loss_scale.counter", "loss_scale.skipped_steps")

    def __init__(self, dynamic: bool, value: float, factor: int = 2, window: int = 1000):
        self.dynamic = dynamic
        if dynamic:
            self.inner = amp.DynamicLossScaler(scale_value=value, scale_factor=int(factor), scale_window=window)
            self.inner.counter.name = "loss_scale.counter"
        else:
            self.inner = amp.StaticLossScaler(scale_value=value)
        self.inner.scale_value.name = "loss_scale.value"
        self.skipped_steps = Parameter(Tensor(0, mstype.int32), name="loss_scale.skipped_steps", requires_grad=False)
        self._seen_skipped = 0

    def scale(self, loss):
        """`loss * scale` (float32 Tensor in, same shape out); usable inside the compiled step."""
        return self.inner.scale(loss)

    def unscale(self, grads):
        """`grads / scale` for a Tensor or a tuple of Tensors (also used on the scaled loss)."""
        return self.inner.unscale(grads)

    def adjust(self, grads_finite):
        """Update the scale from `grads_finite` (a scalar bool Tensor) and count skipped steps; returns it."""
        if self.dynamic:
            self.inner.adjust(grads_finite)
        ops.assign_add(self.skipped_steps, 1 - grads_finite.astype(mstype.int32))
        return grads_finite

    @property
    def value(self) -> float:
        """The current loss scale (a float, e.g. 65536.0)."""
        return float(self.inner.scale_value.asnumpy())

    def step(self, step: int) -> dict | None:
        """Call after each optimizer step: logs and returns {"step", "event", "loss_scale", ...} on overflow."""
        skipped = int(self.skipped_steps.asnumpy())
        if skipped == self._seen_skipped:
            return None
        new = skipped - self._seen_skipped
        self._seen_skipped = skipped
        event = {"step": step, "event": "overflow_skipped", "loss_scale": self.value, "skipped_steps": skipped}
        logger.info("step %d: non-finite gradients, update skipped (%d skipped so far); loss scale now %g%s",
                    step, skipped, event["loss_scale"], f" ({new} overflows)" if new > 1 else "")
        return event

    def metrics(self) -> dict:
        """{"loss_scale": current scale (float), "loss_scale_skipped_steps": overflow steps so far (int)}."""
        return {"loss_scale": self.value, "loss_scale_skipped_steps": int(self.skipped_steps.asnumpy())}

    def state_dict(self) -> dict[str, np.ndarray]:
        """{"loss_scale.value": float32 (), "loss_scale.skipped_steps": int32 (), and for dynamic scaling
        "loss_scale.counter": int32 () (finite steps since the last change)}, copies of the Parameters."""
        out = {"loss_scale.value": self.inner.scale_value.asnumpy().copy(),
               "loss_scale.skipped_steps": self.skipped_steps.asnumpy().copy()}
        if self.dynamic:
            out["loss_scale.counter"] = self.inner.counter.asnumpy().copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Write the saved scale, skipped-step count and (dynamic) counter in place (safe after compiling).
        Raises CheckpointError when a key is missing (e.g. the checkpoint was not trained with fp16 loss scaling)."""
        targets = {"loss_scale.value": (self.inner.scale_value, mstype.float32),
                   "loss_scale.skipped_steps": (self.skipped_steps, mstype.int32)}
        if self.dynamic:
            targets["loss_scale.counter"] = (self.inner.counter, mstype.int32)
        for key, (param, dtype) in targets.items():
            if key not in state:
                raise CheckpointError(key, None, "missing from the checkpoint's precision state (was it fp16?)")
            # In place: set_data would swap the buffer under an already compiled step (see controller.write).
            ops.assign(param, Tensor(np.asarray(state[key]).reshape(()), dtype))
        self._seen_skipped = int(self.skipped_steps.asnumpy())


def build_loss_scaler(cfg: PrecisionConfig) -> LossScaler | NoLossScaler:
    """The scaler `cfg.loss_scale` asks for (none -> NoLossScaler)."""
    if cfg.loss_scale == "none":
        return NoLossScaler()
    return LossScaler(cfg.loss_scale == "dynamic", cfg.loss_scale_value, cfg.loss_scale_factor,
                      cfg.loss_scale_window)
