"""Training objective schema (recipe group `objective/`): what the trainer minimises.

`lm` is next-token cross-entropy (pretraining and SFT). Other objectives (preference tuning, distillation,
contrastive alignment, captioning) register a builder below; each keeps its settings in its own sub-config field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ascend_llm.config.distill import DistillConfig
from ascend_llm.config.multimodal import MultimodalConfig
from ascend_llm.config.preference import PreferenceConfig
from ascend_llm.errors import ConfigError

# objective name -> "module:function" of its builder, imported by train/objective.py only when chosen (a string,
# so that this schema layer imports nothing above it). The builder is called as fn(recipe, lm_loss) -> Objective.
OBJECTIVES: dict[str, str] = {
    "lm": "ascend_llm.train.objective:build_language_modeling",
    "contrastive": "ascend_llm.train.contrastive:build_objective",
    "caption": "ascend_llm.train.caption:build_objective",
    "distill": "ascend_llm.train.distill:build_objective",
    "dpo": "ascend_llm.train.preference:build_objective", "simpo": "ascend_llm.train.preference:build_objective",
}


@dataclass
class ObjectiveConfig:
    """name: the registered objective (OBJECTIVES above); `lm` is next-token cross-entropy."""

    name: str = "lm"
    # objective.name=contrastive | caption (config/multimodal.py)
    multimodal: MultimodalConfig = field(default_factory=MultimodalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # objective.name=distill (config/distill.py)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # dpo | simpo (config/preference.py)

    def validate(self, prefix: str = "objective") -> None:
        """Raises ConfigError naming `objective.name` when it is not a registered objective."""
        if self.name not in OBJECTIVES:
            raise ConfigError(f"{prefix}.name", self.name, "allowed: " + ", ".join(OBJECTIVES))
        if self.name in ("contrastive", "caption"):
            self.multimodal.validate(f"{prefix}.multimodal")
        self.distill.validate(f"{prefix}.distill", required=self.name == "distill")
        self.preference.validate(f"{prefix}.preference")
