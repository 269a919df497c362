"""Precision schema (recipe group `precision/`)."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import one_of

POLICIES = ("fp32",)


@dataclass
class PrecisionConfig:
    name: str = "fp32"

    def validate(self, prefix: str = "precision") -> None:
        one_of(f"{prefix}.name", self.name, POLICIES)
