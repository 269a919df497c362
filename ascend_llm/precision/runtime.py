"""The precision runtime: the loss scaler and the dynamic FP8 controller as one stateful part of a run.

The trainer talks to precision through this one object (torchtitan keeps the same boundary for its
float8 converter): the compiled step uses `scaler` (scale the loss, unscale the gradients, test them for
finite values), and after each optimizer step the loop calls `after_step`, logs `metrics()` and checkpoints
`state_dict()`. State keys are namespaced (`loss_scale.*`, FP8 Parameter names, `precision.controller.*`).
"""

from __future__ import annotations

import numpy as np
from mindspore import nn

from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.precision.controller import PrecisionController, build_controller
from ascend_llm.precision.loss_scale import LossScaler, NoLossScaler, build_loss_scaler


class PrecisionRuntime:
    """Loss scaler (fp16) + FP8 controller. Both may be inert (fp32/bf16 runs): the interface stays."""

    def __init__(self, scaler: LossScaler | NoLossScaler, controller: PrecisionController):
        self.scaler = scaler
        self.controller = controller

    def after_step(self, step: int) -> list[dict]:
        """Call after each optimizer step (all ranks: FP8 statistics are the same on every rank after the
        amax reduction). Returns the events of this step: loss-scale overflows and FP8 rung changes."""
        overflow = self.scaler.step(step)
        return ([overflow] if overflow else []) + self.controller.step(step)

    def overflow_is_calibration(self) -> bool:
        """True while a dynamic fp16 loss scale can still shrink (> 1): gradient overflows then are the scaler
        calibrating itself, not divergence."""
        return isinstance(self.scaler, LossScaler) and self.scaler.dynamic and self.scaler.value > 1.0

    def metrics(self) -> dict:
        """Scalars for metrics.jsonl: loss scale and skipped steps (fp16), FP8 statistics per rung."""
        return {**self.scaler.metrics(), **self.controller.metrics()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """{**scaler.state_dict(), **controller.state_dict()}: name -> np.ndarray (`loss_scale.*`, FP8 Parameter names,
        `precision.controller.<layer>`); empty for fp32/bf16 runs without FP8."""
        return {**self.scaler.state_dict(), **self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Write the saved values in place (safe after compilation). Raises CheckpointError when a key the
        recipe needs is missing (e.g. resuming an fp32 checkpoint with precision=fp16)."""
        self.scaler.load_state_dict(state)
        self.controller.load_state_dict(state)


def build_precision_runtime(model: nn.Cell, cfg: PrecisionConfig) -> PrecisionRuntime:
    """Build after `apply_fp8` (the controller watches the model's Fp8Dense cells)."""
    return PrecisionRuntime(build_loss_scaler(cfg), build_controller(model, cfg))
