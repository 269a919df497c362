"""Training loop schema (recipe group `train/`)."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import non_negative, one_of, positive
from ascend_llm.errors import ConfigError

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class TrainConfig:
    """The loop: steps, batch, logging, validation, checkpoints, resume, the closing sample.

    num_steps: optimizer steps of the whole run (a resumed run continues up to it).
    global_batch_size: sequences per optimizer step, summed over data-parallel ranks and micro-batches
        (tokens per step = global_batch_size * data.seq_len).
    grad_accum_steps: micro-batches per optimizer step on each rank; must divide global_batch_size.
    seed: model initialisation and sampling seed (the data order has its own, data.seed).
    output_dir: run directory (metrics.jsonl, checkpoints/, loss.png, sample.txt, config.yaml).
    log_every: steps between metrics records. val_every: steps between validations.
    val_batches: micro-batches of held-out windows per validation; 0 turns validation off (not even at the last
        step: no val_loss in the records, no evaluation graph compiled).
    ckpt_every: steps between checkpoints (also at the last step). keep_last: checkpoints of this run kept.
    resume: none (fresh run; refused if output_dir holds another run) | auto (newest checkpoint that verifies)
        | a checkpoint directory (that one, or exit 2).
    overwrite: with resume=none, remove another run's checkpoints and metrics in output_dir first.
    allow_data_change: on resume, accept another data.path / data.seq_len / data.seed (the data position
        restarts at 0); another tokenizer is always refused.
    max_nonfinite_steps: stop (exit 3) after this many optimizer steps in a row with non-finite loss or
        gradients (each such step changes no parameter).
    sample_prompt / sample_tokens / sample_top_k: the closing sample (top_k=1 is greedy; 0 tokens: none).
    progress: show a progress bar (main rank).
    """

    num_steps: int = 300
    global_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 10
    val_every: int = 100
    val_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 3
    resume: str = "none"
    overwrite: bool = False
    allow_data_change: bool = False
    max_nonfinite_steps: int = 5
    sample_prompt: str = "def "
    sample_tokens: int = 48
    sample_top_k: int = 1
    progress: bool = True
    # Activation recompute per decoder layer: none | selective (the attention core) | full (whole layer).
    recompute: str = "none"
    # Refuse to start when the memory planner (`ascend-llm plan`) says the recipe cannot fit its declared budget
    # (cluster.device_memory_gib when set; on Ascend also the pool cap runtime.max_device_memory).
    memory_check: bool = True

    def validate(self, prefix: str = "train") -> None:
        """Raises ConfigError naming the field: a count or interval <= 0 (val_batches < 0), negative sample_tokens or
        seed, an unknown recompute mode, grad_accum_steps not dividing global_batch_size, or an empty resume."""
        for name in ("num_steps", "global_batch_size", "grad_accum_steps", "log_every", "val_every",
                     "ckpt_every", "keep_last", "sample_top_k", "max_nonfinite_steps"):
            positive(f"{prefix}.{name}", getattr(self, name))
        non_negative(f"{prefix}.val_batches", self.val_batches)
        non_negative(f"{prefix}.sample_tokens", self.sample_tokens)
        non_negative(f"{prefix}.seed", self.seed)
        one_of(f"{prefix}.recompute", self.recompute, RECOMPUTE_MODES)
        one_of(f"{prefix}.memory_check", self.memory_check, (True, False))
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"{prefix}.grad_accum_steps", self.grad_accum_steps,
                              f"must divide train.global_batch_size={self.global_batch_size}")
        if not self.resume:
            raise ConfigError(f"{prefix}.resume", self.resume, "allowed: none, auto, or a checkpoint directory")
