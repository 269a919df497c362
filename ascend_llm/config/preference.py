"""Preference-tuning schema (`objective.preference`, used when objective.name=dpo or simpo; train/preference.py).

Data: data.path holds records {"prompt", "chosen", "rejected"} (plain text, or chat messages rendered with the
model's chat template; data/preference.py), cut at data.seq_len + 1 tokens per data.sft_overlong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ascend_llm.config.checks import in_range, one_of, positive
from ascend_llm.errors import ConfigError

DPO_LOSSES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("auto", "adapters_off", "cached")


@dataclass
class PreferenceConfig:
    """loss (objective.name=dpo): sigmoid (Rafailov et al. 2023), ipo (Azar et al. 2023), hinge (SLiC, Zhao et
    al. 2023). beta > 0: the KL weight of DPO (rewards are beta * log-ratio to the reference) or SimPO's reward
    scale (beta * length-normalised log-probability; Meng et al. 2024). label_smoothing in [0, 0.5): the assumed
    share of flipped labels (conservative DPO; sigmoid and SimPO). gamma >= 0: SimPO's target margin.
    sft_weight >= 0: weight of an added SFT term, the chosen answer's mean token negative log-likelihood
    (MindSpeed-LLM's pref-ftx, RPO). reference: where DPO's reference log-probabilities come from:
    adapters_off (LoRA runs: the same model with its adapters off, no second copy of the weights), cached
    (computed once with the initial model before training and cached on disk in cache_dir, default
    data.cache_dir/reference), auto (adapters_off with lora.enabled, else cached). SimPO needs no reference.
    average_logps (DPO losses): use each response's per-token mean log-probability (policy and reference, each
    divided by the response's token count) instead of the sum, as TRL does for loss_type=ipo (its IPO
    implementation; the IPO paper and Rafailov et al. use sums, the default). Rewards and logps metrics are then
    per-token too, and beta's scale changes (TRL's IPO default is beta 0.1 on averages). SimPO always averages."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    sft_weight: float = 0.0
    reference: str = "auto"
    cache_dir: Optional[str] = None
    average_logps: bool = False

    def validate(self, prefix: str = "objective.preference") -> None:
        """Raises ConfigError naming the field: loss or reference outside the allowed sets, beta <= 0,
        label_smoothing outside [0, 0.5) or set with ipo or hinge, gamma or sft_weight < 0. (reference=adapters_off
        without lora.enabled is refused by resolve_reference, from the recipe's cross-group check.)"""
        one_of(f"{prefix}.loss", self.loss, DPO_LOSSES)
        one_of(f"{prefix}.reference", self.reference, REFERENCES)
        positive(f"{prefix}.beta", self.beta)
        in_range(f"{prefix}.label_smoothing", self.label_smoothing, 0.0, 0.5)
        if self.label_smoothing >= 0.5:
            raise ConfigError(f"{prefix}.label_smoothing", self.label_smoothing, "must be < 0.5")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"{prefix}.label_smoothing", self.label_smoothing, f"applies to loss=sigmoid and "
                              f"SimPO only, not loss={self.loss}")
        for name in ("gamma", "sft_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "must be >= 0")


PREFERENCE_OBJECTIVES = ("dpo", "simpo")


def resolve_reference(objective_name: str, cfg: PreferenceConfig, lora_enabled: bool) -> str:
    """Where the reference log-probabilities come from: none (SimPO), adapters_off or cached (reference=auto:
    adapters_off with LoRA, else cached). Raises ConfigError for reference=adapters_off without lora.enabled (the
    reference is the model with its adapters off); the recipe's cross-group check calls this, so `launch` refuses
    it before any worker starts."""
    if objective_name == "simpo":
        return "none"
    if cfg.reference == "auto":
        return "adapters_off" if lora_enabled else "cached"
    if cfg.reference == "adapters_off" and not lora_enabled:
        raise ConfigError("objective.preference.reference", cfg.reference, "adapters_off needs lora.enabled=true "
                          "(the reference is the model with its adapters off); use cached for a full fine-tune")
    return cfg.reference


def step_work(recipe) -> tuple[int, bool]:
    """(sequences per data row, whether each step runs a second, reference forward) of a recipe, read by the
    planner (parallel/plan.py) and the trainer's throughput/MFU (train/session.py): a preference pair is two
    sequences (chosen and rejected rows in one forward); DPO with reference=adapters_off also runs the model with
    its adapters off, forward only (nothing kept for a backward). Cached references and SimPO add no forward per
    step (the cache is computed once, before training). Any other objective: (1, False)."""
    objective = recipe.objective
    if objective.name not in PREFERENCE_OBJECTIVES:
        return 1, False
    mode = resolve_reference(objective.name, objective.preference, bool(recipe.lora.enabled))
    return 2, mode == "adapters_off"
