"""Per-request sampling on the host: repetition penalty, temperature, top-k, top-p, in the order and with the
semantics of transformers' logits processors (RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper). temperature 0 (or top_k 1) is greedy argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ascend_llm.errors import ConfigError


@dataclass
class SamplingParams:
    """How one request is decoded.

    max_new_tokens: tokens to generate at most; temperature: 0 = greedy; top_k: 0 = off; top_p: 1.0 = off
    (smallest set of tokens whose probability reaches top_p); repetition_penalty: 1.0 = off (CTRL paper,
    arXiv:1909.05858: a seen token's logit l becomes l / p if l > 0 else l * p); stop_token_ids: generation
    ends after emitting one (EOS ids from generation_config.json); stop_strings: generation ends when the
    decoded continuation contains one (the text is cut before it); seed: the request's random stream.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", self.max_new_tokens, "must be >= 1")
        if self.temperature < 0:
            raise ConfigError("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError("top_k", self.top_k, "must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits (V,) float64; seen: token ids already in the sequence (prompt + generated)."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    picked = out[ids]
    out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Logits (V,) float64 with tokens outside the top-k / top-p nucleus set to -inf (at least one kept)."""
    out = logits.copy()
    if 0 < top_k < out.size:
        kth = np.partition(out, -top_k)[-top_k]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, kind="stable")
        probs = np.exp(out[order] - out[order[0]])
        probs /= probs.sum()
        cumulative = np.cumsum(probs)
        cut = int(np.searchsorted(cumulative, top_p)) + 1  # keep tokens until the mass reaches top_p
        out[order[cut:]] = -np.inf
    return out


def sample_next(logits: np.ndarray, params: SamplingParams, seen: np.ndarray, rng: np.random.Generator) -> int:
    """Next token id from one row of logits (V,) under `params`; `rng` is the request's own stream."""
    scores = apply_repetition_penalty(np.asarray(logits, np.float64), seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(scores))
    scores = filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
    probs = np.exp(scores - scores.max())
    return int(rng.choice(scores.size, p=probs / probs.sum()))
