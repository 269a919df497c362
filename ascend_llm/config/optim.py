"""Optimizer and LR schedule schema (recipe group `optim/`)."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import in_range, non_negative, positive


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables

    def validate(self, prefix: str = "optim") -> None:
        positive(f"{prefix}.lr", self.lr)
        in_range(f"{prefix}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        non_negative(f"{prefix}.warmup_steps", self.warmup_steps)
        non_negative(f"{prefix}.weight_decay", self.weight_decay)
        in_range(f"{prefix}.beta1", self.beta1, 0.0, 0.999999)
        in_range(f"{prefix}.beta2", self.beta2, 0.0, 0.999999)
        positive(f"{prefix}.eps", self.eps)
        non_negative(f"{prefix}.grad_clip", self.grad_clip)
