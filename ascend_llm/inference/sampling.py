"""Per-request sampling on the host: repetition penalty, temperature, top-k, top-p, in the order and with the
semantics of transformers' logits processors (RepetitionPenaltyLogitsProcessor, then TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper). temperature 0 (or below 1e-5, as vLLM's _SAMPLING_EPS, or top_k 1) is greedy
argmax. Log-probabilities are log_softmax of the raw model logits the token was drawn from (what OpenAI reports).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from ascend_llm.errors import UserInputError

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound
GREEDY_EPS = 1e-5  # vLLM treats temperatures below this as greedy


class RequestError(UserInputError):
    """A request that can never be served as asked (bad sampling value, prompt too long for the context...)."""

    area = "request"


@dataclass
class SamplingParams:
    """How one request is decoded.

    max_new_tokens: tokens to generate at most (None = the rest of the context); temperature: 0 = greedy, at most 2
    (OpenAI's range); top_k: 0 = off; top_p: 1.0 = off (smallest set of tokens whose probability reaches top_p);
    repetition_penalty: 1.0 = off (CTRL paper, arXiv:1909.05858: a seen token's logit l becomes l / p if l > 0
    else l * p), in [0.01, 2]; stop_token_ids: generation ends after emitting one (EOS ids from
    generation_config.json); stop_strings: generation ends when the continuation's text contains one (the text is
    cut before it); seed: the request's random stream, in [0, 2**63-1] (None: a fresh stream); logprobs: None,
    or k in [0, 20]: the chosen token's log-probability plus the k most likely alternatives.
    """

    max_new_tokens: int | None = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = 0
    logprobs: int | None = None

    def validate(self) -> None:
        """Raise RequestError (one line naming the field) for any value that could poison a batch."""
        _int_in("max_new_tokens", self.max_new_tokens, 1, None, optional=True)
        _int_in("top_k", self.top_k, 0, None)
        _int_in("seed", self.seed, 0, MAX_SEED, optional=True)
        _int_in("logprobs", self.logprobs, 0, MAX_LOGPROBS, optional=True)
        t = _real("temperature", self.temperature)
        if not (t == 0.0 or sys.float_info.min <= t <= 2.0):
            raise RequestError("temperature", self.temperature, "must be 0 (greedy) or a normal float in (0, 2]")
        p = _real("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise RequestError("top_p", self.top_p, "must be in (0, 1] (1 = off)")
        r = _real("repetition_penalty", self.repetition_penalty)
        if not 0.01 <= r <= 2.0:
            raise RequestError("repetition_penalty", self.repetition_penalty, "must be in [0.01, 2] (1 = off)")
        for token in self.stop_token_ids:
            _int_in("stop_token_ids", token, 0, None)
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise RequestError("stop_strings", stop, "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def needs_logits(self) -> bool:
        """Whether the host needs the full logits row (not only the device-side argmax)."""
        return not self.greedy or self.repetition_penalty != 1.0 or self.logprobs is not None


def _int_in(name: str, value, low: int, high: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise RequestError(name, value, f"must be {allowed}" + (" or null" if optional else ""))


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise RequestError(name, value, "must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(name, value, "must be finite")
    return value


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
    """Next token id from one row of logits (V,) under `params`; `rng` is the request's own stream.
    Raises FloatingPointError when the processed distribution is not finite (the request alone fails)."""
    scores = apply_repetition_penalty(np.asarray(logits, np.float64), seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(scores))
    scores = filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
    probs = np.exp(scores - scores.max())
    total = probs.sum()
    if not np.isfinite(total) or total <= 0:
        raise FloatingPointError(f"sampling distribution is not finite (sum {total})")
    return int(rng.choice(scores.size, p=probs / total))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax of one row (V,) in float64 (OpenAI's logprobs are of the raw model distribution)."""
    scores = np.asarray(logits, np.float64)
    shifted = scores - scores.max()
    return shifted - np.log(np.exp(shifted).sum())


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of a log-probability row, most likely first (ties: lower id)."""
    if k <= 0:
        return []
    top = np.argpartition(-logprobs, min(k, logprobs.size) - 1)[:k]
    top = top[np.lexsort((top, -logprobs[top]))]
    return [(int(i), float(logprobs[i])) for i in top]
