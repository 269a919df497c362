"""Knowledge-distillation schema (`objective.distill`, used when objective.name=distill; train/distill.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ascend_llm.config.checks import in_range, positive
from ascend_llm.errors import ConfigError


@dataclass
class DistillConfig:
    """teacher: the teacher model directory (Hugging Face, toolkit run or checkpoint, quantized; opened by
    interop.source.open_model, frozen); it must share the student's tokenizer (data.tokenizer).
    kd_ratio: weight of the distillation term, in [0, 1]: loss = (1 - kd_ratio) * CE + kd_ratio * tau^2 *
    KL(teacher_tau || student_tau) (Hinton et al. 2015; NeMo's KDLoss and torchtune's kd_ratio).
    temperature: tau > 0, both distributions are softmax(logits / tau).
    chunk_tokens: tokens per chunk of the KL's softmaxes (forward and backward), so no (tokens x vocab)
    probability matrix of the teacher is ever held whole; a chunk's transient memory is about
    4 x chunk_tokens x vocab x 8 bytes on CPU (float64): 128 MiB at 1024 x 4096, so lower it for a 150k vocabulary."""

    teacher: Optional[str] = None
    kd_ratio: float = 0.5
    temperature: float = 1.0
    chunk_tokens: int = 1024

    def validate(self, prefix: str = "objective.distill", required: bool = False) -> None:
        """Raises ConfigError naming the field: kd_ratio outside [0, 1], temperature or chunk_tokens <= 0, or (when
        required: objective.name=distill) no teacher."""
        in_range(f"{prefix}.kd_ratio", self.kd_ratio, 0.0, 1.0)
        positive(f"{prefix}.temperature", self.temperature)
        positive(f"{prefix}.chunk_tokens", self.chunk_tokens)
        if required and not self.teacher:
            raise ConfigError(f"{prefix}.teacher", self.teacher, "objective.name=distill needs a teacher model "
                              "directory (Hugging Face, run, checkpoint or quantized)")
