"""Dynamic precision adjustment: each FP8 layer climbs the ladder fp8 -> bf16 -> fp32 when its FP8 casts
keep overflowing or underflowing, and comes back down after a run of clean steps.

Per step (`controller.step(step)`, called by the trainer after the optimizer step) the controller reads every
Fp8Dense's statistics — the graph wrote them into non-trainable Parameters during the step — for the
input (x), weight (w) and output-gradient (g) casts: amax, overflow fraction (values that saturate) and
underflow fraction (non-zero values that flush to zero). A step is *bad* for a layer when any overflow
fraction exceeds `overflow_threshold`, any underflow fraction exceeds `underflow_threshold`, or an amax is
not finite. After `patience` (K) consecutive bad steps the layer is promoted one rung; after `clean_steps`
(M) consecutive clean steps it is demoted one rung. The statistics are always those of the FP8 cast, so a
promoted layer can prove it would be clean in FP8 again. The rung is a Parameter read by the compiled
graph: changing it needs no recompilation.

Without `precision.dynamic.enabled` the controller only reports statistics (metrics) and saves FP8 state.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ascend_llm.config.precision import LEVELS, DynamicConfig, PrecisionConfig
from ascend_llm.errors import CheckpointError
from ascend_llm.precision.fp8_dense import ROLES, STAT_NAMES, Fp8Dense, fp8_layers

logger = logging.getLogger("ascend_llm.precision")
COUNTER_PREFIX = "precision.controller."


def write(param: Parameter, value: np.ndarray) -> None:
    """Overwrite a Parameter in place. (`Parameter.set_data` swaps the buffer, and a function already
    compiled with `ms.jit` keeps reading the old one; an eager ops.assign writes the buffer it reads.)"""
    ops.assign(param, Tensor(np.asarray(value).reshape(param.shape), param.dtype))


class PrecisionController:
    """Per-layer dynamic precision over `layers` ({cell path: Fp8Dense}): rung 0 = fp8, 1 = bf16, 2 = fp32, up to
    `cfg.max_level`; the policy is described in the module docstring."""

    def __init__(self, layers: dict[str, Fp8Dense], cfg: DynamicConfig):
        self.layers = layers
        self.cfg = cfg
        self.max_level = LEVELS.index(cfg.max_level)
        self.levels = {name: 0 for name in layers}
        self.bad_streak = {name: 0 for name in layers}
        self.clean_streak = {name: 0 for name in layers}
        self.last_stats: dict[str, np.ndarray] = {}
        self.decisions: list[dict] = []

    @property
    def enabled(self) -> bool:
        """True when the model has FP8 layers and `precision.dynamic.enabled` is set."""
        return bool(self.layers) and self.cfg.enabled

    def read_stats(self) -> dict[str, np.ndarray]:
        """{layer: (3 roles x 3 stats) array} as written by the latest forward/backward."""
        return {name: np.stack([getattr(cell, f"fp8_{role}_stats").asnumpy() for role in ROLES])
                for name, cell in self.layers.items()}

    def _verdict(self, stats: np.ndarray) -> str | None:
        """Why this step is bad for the layer, or None when it is clean."""
        for i, role in enumerate(ROLES):
            amax, overflow, underflow = (float(v) for v in stats[i])
            if not math.isfinite(amax):
                return f"{role} amax is {amax}"
            if overflow > self.cfg.overflow_threshold:
                return f"{role} overflow {overflow:.3g} > {self.cfg.overflow_threshold:g}"
            if underflow > self.cfg.underflow_threshold:
                return f"{role} underflow {underflow:.3g} > {self.cfg.underflow_threshold:g}"
        return None

    def _set_level(self, name: str, level: int) -> None:
        self.levels[name] = level
        write(self.layers[name].fp8_level, np.float32(level))

    def step(self, step: int) -> list[dict]:
        """Read this step's statistics and apply the policy; returns (and logs) the decisions taken."""
        if not self.layers:
            return []
        self.last_stats = self.read_stats()
        if not self.cfg.enabled:
            return []
        decisions = []
        for name, stats in self.last_stats.items():
            reason = self._verdict(stats)
            level = self.levels[name]
            if reason is not None:
                self.bad_streak[name] += 1
                self.clean_streak[name] = 0
                if self.bad_streak[name] >= self.cfg.patience and level < self.max_level:
                    decisions.append(self._decide(step, name, "promote", level + 1,
                                                  f"{reason} for {self.bad_streak[name]} consecutive steps"))
                    self.bad_streak[name] = 0
            else:
                self.clean_streak[name] += 1
                self.bad_streak[name] = 0
                if self.clean_streak[name] >= self.cfg.clean_steps and level > 0:
                    decisions.append(self._decide(step, name, "demote", level - 1,
                                                  f"FP8 casts clean for {self.clean_streak[name]} steps"))
                    self.clean_streak[name] = 0
        return decisions

    def _decide(self, step: int, name: str, action: str, level: int, reason: str) -> dict:
        decision = {"step": step, "layer": name, "action": action, "from": LEVELS[self.levels[name]],
                    "to": LEVELS[level], "reason": reason}
        self._set_level(name, level)
        self.decisions.append(decision)
        logger.info("step %d: %s %s %s -> %s: %s", step, action, name, decision["from"], decision["to"], reason)
        return decision

    def metrics(self) -> dict:
        """Flat per-layer statistics of the latest step (fp8/<layer>/<role>_<stat>, fp8/<layer>/level) plus
        the worst overflow/underflow over layers and the number of layers on each rung."""
        out: dict = {}
        if not self.last_stats:
            return out
        worst_overflow = worst_underflow = 0.0
        for name, stats in self.last_stats.items():
            for i, role in enumerate(ROLES):
                for j, stat in enumerate(STAT_NAMES):
                    out[f"fp8/{name}/{role}_{stat}"] = float(stats[i, j])
            out[f"fp8/{name}/level"] = LEVELS[self.levels[name]]
            worst_overflow = max(worst_overflow, float(np.nanmax(stats[:, 1])))
            worst_underflow = max(worst_underflow, float(np.nanmax(stats[:, 2])))
        out["fp8/max_overflow"] = worst_overflow
        out["fp8/max_underflow"] = worst_underflow
        for i, level in enumerate(LEVELS):
            out[f"fp8/num_layers_{level}"] = sum(1 for v in self.levels.values() if v == i)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """FP8 buffers (amax histories, scales, stats, rungs) by Parameter name, plus per-layer counters
        [level, bad_streak, clean_streak] under `precision.controller.<layer>`."""
        out = {}
        for name, cell in self.layers.items():
            for _, param in cell.parameters_and_names():
                if not param.requires_grad:
                    out[param.name] = param.asnumpy().copy()
            counters = [self.levels[name], self.bad_streak[name], self.clean_streak[name]]
            out[COUNTER_PREFIX + name] = np.asarray(counters, np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Write the FP8 buffers and per-layer counters of `state` in place (safe after compiling). Raises
        CheckpointError when an FP8 buffer is missing (trained without FP8 or with other FP8 layers) or has
        another shape (e.g. amax_history_len changed); missing counters (older checkpoints) keep the rung stored
        in fp8_level."""
        for name, cell in self.layers.items():
            for _, param in cell.parameters_and_names():
                if param.requires_grad:
                    continue
                if param.name not in state:
                    raise CheckpointError(param.name, None, "missing from the checkpoint's precision state "
                                          "(trained without FP8, or with another FP8 layer set?)")
                value = np.asarray(state[param.name], np.float32)
                if value.shape != tuple(param.shape):
                    raise CheckpointError(param.name, value.shape, f"shape must be {tuple(param.shape)} "
                                          "(amax_history_len changed?)")
                write(param, value)
            counters = state.get(COUNTER_PREFIX + name)
            if counters is not None:
                level, self.bad_streak[name], self.clean_streak[name] = (int(v) for v in counters)
                self._set_level(name, level)
            else:
                self.levels[name] = int(round(float(cell.fp8_level.asnumpy())))


def build_controller(model: nn.Cell, cfg: PrecisionConfig) -> PrecisionController:
    """A controller over every Fp8Dense in the model (call after apply_fp8). With no FP8 layers it does
    nothing and saves nothing; without cfg.dynamic.enabled it only reports statistics and saves FP8 state."""
    return PrecisionController(fp8_layers(model), cfg.dynamic)
