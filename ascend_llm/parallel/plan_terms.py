"""The planner's ground floor (pure Python): the memory term type, the phases of a step, units, and the KV-head
split, shared by plan_memory.py and plan_activations.py (which plan_memory.py calls)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
MIB = 2**20

# Phases of a step. ALWAYS terms live through the whole step; of the others only the largest phase adds to the
# peak: activations are freed layer by layer as the backward produces the gradients (the memory pool frees a
# tensor at its last use), so the step's peak is at the start of the backward (everything the forward kept,
# the logits and their gradient) or at its end (the whole gradient beside the last layer's activations), or
# in the accumulation or the update that follow.
ALWAYS, OUTSIDE_POOL = "always", "outside the pool"
PHASES = ("backward start", "backward end", "accumulation", "update")


@dataclass(frozen=True)
class Term:
    """One memory term: bytes per device, the formula that gave it, where the formula comes from."""

    name: str
    bytes: float
    formula: str
    source: str
    phase: str = ALWAYS

    @property
    def gib(self) -> float:
        """The term in GiB (bytes / 2**30)."""
        return self.bytes / GIB


def kv_heads_per_device(model: Any, tp: int) -> int:
    """KV heads a tensor-parallel rank holds: split when tp divides them, else one (replicated) head."""
    return max(model.num_kv_heads // tp, 1)
