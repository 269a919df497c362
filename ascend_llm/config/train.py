"""Training loop schema (recipe group `train/`)."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import non_negative, one_of, positive
from ascend_llm.errors import ConfigError

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class TrainConfig:
    num_steps: int = 300
    global_batch_size: int = 8  # sequences per optimizer step, summed over ranks and micro-batches
    grad_accum_steps: int = 1
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 3
    resume: str = "none"  # none | auto | <path to a checkpoint directory>
    sample_prompt: str = "def "
    sample_tokens: int = 48
    sample_top_k: int = 1  # 1 = greedy
    progress: bool = True
    # Activation recompute per decoder layer: none | selective (the attention core) | full (whole layer).
    recompute: str = "none"
    # Refuse to start on Ascend when the memory planner (`ascend-llm plan`) says the recipe cannot fit.
    memory_check: bool = True

    def validate(self, prefix: str = "train") -> None:
        for name in ("num_steps", "global_batch_size", "grad_accum_steps", "log_every", "val_every",
                     "val_batches", "ckpt_every", "keep_last", "sample_top_k"):
            positive(f"{prefix}.{name}", getattr(self, name))
        non_negative(f"{prefix}.sample_tokens", self.sample_tokens)
        non_negative(f"{prefix}.seed", self.seed)
        one_of(f"{prefix}.recompute", self.recompute, RECOMPUTE_MODES)
        one_of(f"{prefix}.memory_check", self.memory_check, (True, False))
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"{prefix}.grad_accum_steps", self.grad_accum_steps,
                              f"must divide train.global_batch_size={self.global_batch_size}")
        if not self.resume:
            raise ConfigError(f"{prefix}.resume", self.resume, "allowed: none, auto, or a checkpoint directory")
