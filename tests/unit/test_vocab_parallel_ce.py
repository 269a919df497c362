"""VocabParallelCrossEntropy on one rank (TP group of size 1) against float64 NumPy: value and gradient
(softmax - onehot over the counted tokens), with ignored labels (-100). The 2-rank case (padding, a shard
without targets) runs under msrun in tests/integration/test_tpcp_msrun.py."""

from __future__ import annotations

import numpy as np


def numpy_ce(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over labels != -100 and its gradient, float64 (the textbook formulas)."""
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    y = labels.reshape(-1)
    keep = y != -100
    shifted = flat - flat.max(-1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(-1))
    losses = logz - shifted[np.arange(len(y)), np.where(keep, y, 0)]
    count = max(keep.sum(), 1)
    grad = np.exp(shifted - logz[:, None])
    grad[np.arange(len(y)), np.where(keep, y, 0)] -= 1.0
    grad *= keep[:, None] / count
    return float((losses * keep).sum() / count), grad.reshape(logits.shape)


def test_matches_numpy_value_and_gradient():
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.parallel.comm import Group
    from ascend_llm.parallel.tp import VocabParallelCrossEntropy

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((2, 5, 11)) * 3).astype(np.float32)
    labels = rng.integers(0, 11, size=(2, 5)).astype(np.int32)
    labels[0, 1] = labels[1, 4] = -100
    loss_fn = VocabParallelCrossEntropy(Group("tp", (0,), 0), vocab_size=11)

    def loss_of(x, y):
        return loss_fn(x, y)

    loss, grad = ms.value_and_grad(loss_of)(Tensor(logits), Tensor(labels))
    want, want_grad = numpy_ce(logits, labels)
    np.testing.assert_allclose(float(loss.asnumpy()), want, rtol=1e-6)
    np.testing.assert_allclose(grad.asnumpy(), want_grad, rtol=1e-5, atol=1e-7)
