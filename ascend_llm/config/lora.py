"""LoRA schema (recipe field group `lora`): lora.enabled=true makes the trainer apply models/lora.py's
`apply_lora` as a converter (train/build.py); only the adapters train and are checkpointed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ascend_llm.errors import ConfigError

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoraConfig:
    """rank r > 0, alpha > 0 (scaling alpha / r), dropout in [0, 1) on the adapter's input, targets: sub-cell
    names to adapt (default wq, wv as in the LoRA paper), seed of A's initialisation."""

    enabled: bool = False  # the trainer applies LoRA only when true (recipe field group `lora`)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])
    seed: int = 0

    def validate(self, prefix: str = "lora") -> None:
        """Raises ConfigError naming the field: rank < 1, alpha <= 0, dropout outside [0, 1), or targets empty or naming
        a sub-cell other than wq wk wv wo w1 w2 w3."""
        if self.rank < 1:
            raise ConfigError(f"{prefix}.rank", self.rank, "must be >= 1")
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha", self.alpha, "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"{prefix}.targets", list(self.targets), "allowed: " + ", ".join(TARGETS))
