"""Perplexity of a causal LM over one long token stream, with strided sliding windows.

Windows of `window` tokens start every `stride` tokens (the last one ends at the stream's end). Every token
after the first is scored exactly once, by the first window that contains it and has not scored it yet, so each
token sees between window - stride and window - 1 tokens of context (the Hugging Face "perplexity of
fixed-length models" procedure). The stride is capped at window - 1, so that the first token a window scores
has at least one token of context (with stride = window, Hugging Face's loop leaves it unscored).
perplexity = exp(sum of -log p(token | context) / number of scored tokens),
the log-softmax taken in float64 from the model's float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor

from ascend_llm.errors import ConfigError


@dataclass
class PerplexityResult:
    """perplexity = exp(nll_sum / num_tokens); nll_sum in nats over num_tokens scored tokens (every token but the
    first), from num_windows windows of `window` tokens every `stride` tokens (the stride actually used)."""

    perplexity: float
    nll_sum: float
    num_tokens: int
    num_windows: int
    window: int
    stride: int

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token, in nats (log of the perplexity)."""
        return self.nll_sum / self.num_tokens


def window_plan(num_ids: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """[(begin, end, first scored position)]: window ids[begin:end] scores targets ids[first:end]. Raises
    ConfigError for fewer than 2 tokens, window < 2, or stride outside [1, window]."""
    if num_ids < 2:
        raise ConfigError("eval.corpus", f"{num_ids} tokens", "needs at least 2 tokens")
    if window < 2:
        raise ConfigError("eval.window", window, "must be >= 2")
    if not 0 < stride <= window:
        raise ConfigError("eval.stride", stride, f"must be in [1, window={window}]")
    stride = min(stride, window - 1)
    plan, scored, begin = [], 1, 0
    while scored < num_ids:
        end = min(begin + window, num_ids)
        plan.append((begin, end, scored))
        scored = end
        begin += stride
    return plan


def _token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logz = np.log(np.exp(x).sum(-1))
    return logz - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def perplexity(model, ids: np.ndarray, window: int, stride: int, max_seq_len: int,
               batch_size: int = 4) -> PerplexityResult:
    """Perplexity of `model` (tokens (B, T) int32 -> logits (B, T, V)) over ids (N,) int, `batch_size` windows
    of equal length per forward. ConfigError when window exceeds the model's max_seq_len or is < 2, stride is
    outside [1, window], or ids has fewer than 2 tokens."""
    if window > max_seq_len:
        raise ConfigError("eval.window", window, f"must be <= the model's max_seq_len={max_seq_len}")
    ids = np.asarray(ids, np.int64)
    plan = window_plan(len(ids), window, stride)
    total = 0.0
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for item in plan:
        by_length.setdefault(item[1] - item[0], []).append(item)
    for length, items in by_length.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            tokens = np.stack([ids[b:e] for b, e, _ in chunk]).astype(np.int32)
            logits = model(Tensor(tokens)).asnumpy()
            for row, (b, e, first) in enumerate(chunk):
                pred = logits[row, first - 1 - b:e - 1 - b]
                total += float(_token_nll(pred, ids[first:e]).sum())
    count = len(ids) - 1
    return PerplexityResult(float(np.exp(total / count)), total, count, len(plan), window, min(stride, window - 1))
