"""Sliding-window perplexity against a float64 NumPy bigram model whose exact perplexity is known."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.errors import ConfigError
from ascend_llm.eval.perplexity import perplexity, window_plan


class Bigram:
    """logits[b, t] = log P[tokens[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, probs):
        self.logp = np.log(probs)
        self.shapes = []

    def __call__(self, tokens):
        t = tokens.asnumpy()
        self.shapes.append(t.shape)

        class Out:
            def __init__(self, value):
                self.value = value

            def asnumpy(self):
                return self.value

        return Out(self.logp[t].astype(np.float32))


def test_window_plan_scores_every_token_once():
    for n, window, stride in [(10, 4, 2), (10, 4, 4), (11, 5, 1), (3, 8, 8), (100, 16, 7)]:
        plan = window_plan(n, window, stride)
        scored = [p for b, e, first in plan for p in range(first, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= window and first > b for b, e, first in plan)
        assert plan[-1][1] == n


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (16, 16), (5, 1)])
def test_perplexity_equals_exact_bigram_value(window, stride):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=6)
    ids = rng.integers(0, 6, size=57)
    model = Bigram(probs)
    result = perplexity(model, ids, window, stride, max_seq_len=16, batch_size=3)
    exact = np.exp(-np.mean(np.log(probs[ids[:-1], ids[1:]])))
    assert result.num_tokens == 56 and result.window == window and result.stride == min(stride, window - 1)
    assert result.perplexity == pytest.approx(exact, rel=1e-6)
    assert len({s[1] for s in model.shapes}) <= 2  # full windows batched; at most one shorter tail shape


def test_perplexity_bad_settings():
    model = Bigram(np.full((2, 2), 0.5))
    with pytest.raises(ConfigError, match="eval.window"):
        perplexity(model, np.zeros(10, np.int64), 64, 8, max_seq_len=32)
    with pytest.raises(ConfigError, match="eval.stride"):
        perplexity(model, np.zeros(10, np.int64), 8, 9, max_seq_len=32)
