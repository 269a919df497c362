"""Optimizer and LR schedule schema (recipe group `optim/`)."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import in_range, non_negative, positive


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (Loshchilov & Hutter 2019) and bias correction; linear warmup then
    cosine decay to lr * min_lr_ratio at train.num_steps.

    name: adamw (the only optimizer). lr: peak learning rate. min_lr_ratio: final lr / peak lr, in [0, 1].
    warmup_steps: optimizer steps of linear warmup from 0. weight_decay: decoupled decay per step (norms and
    biases excluded). beta1, beta2, eps: Adam moment coefficients and denominator epsilon.
    grad_clip: clip the global L2 norm of the gradients to this value (0 disables).
    """

    name: str = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def validate(self, prefix: str = "optim") -> None:
        """Raises ConfigError naming the field: lr or eps <= 0, min_lr_ratio outside [0, 1], beta1/beta2 outside
        [0, 0.999999], or a negative warmup_steps, weight_decay or grad_clip."""
        positive(f"{prefix}.lr", self.lr)
        in_range(f"{prefix}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        non_negative(f"{prefix}.warmup_steps", self.warmup_steps)
        non_negative(f"{prefix}.weight_decay", self.weight_decay)
        in_range(f"{prefix}.beta1", self.beta1, 0.0, 0.999999)
        in_range(f"{prefix}.beta2", self.beta2, 0.0, 0.999999)
        positive(f"{prefix}.eps", self.eps)
        non_negative(f"{prefix}.grad_clip", self.grad_clip)
