"""Learning rate: linear warmup to the peak, then cosine decay to min_lr_ratio * peak at num_steps."""

from __future__ import annotations

import math

from ascend_llm.config.optim import OptimConfig


def lr_at(step: int, cfg: OptimConfig, num_steps: int) -> float:
    """LR for optimizer step `step` (0-based). Warmup reaches the peak at step warmup_steps - 1."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, num_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
