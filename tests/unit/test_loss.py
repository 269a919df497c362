"""Token cross-entropy (fused kernel) against a float64 NumPy reference: value and gradient."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ascend_llm.train.loss import token_cross_entropy
from ascend_llm.train.step import cross_entropy_loss


def reference(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """loss = mean(logsumexp(z) - z[label]); d loss / d z = (softmax(z) - onehot) / N, all float64."""
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    y = labels.reshape(-1)
    shifted = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(-1))
    loss = float(np.mean(lse - shifted[np.arange(len(y)), y]))
    probs = np.exp(shifted - lse[:, None])
    probs[np.arange(len(y)), y] -= 1.0
    return loss, (probs / len(y)).reshape(logits.shape)


def _data(seed: int, shape=(2, 5, 11), scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * scale).astype(np.float32)
    labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    return logits, labels


def test_loss_and_gradient_match_float64_reference_in_graph_mode():
    logits, labels = _data(0)
    ref_loss, ref_grad = reference(logits, labels)
    grad_fn = ms.jit(ms.value_and_grad(token_cross_entropy, 0))
    loss, grad = grad_fn(Tensor(logits), Tensor(labels))
    assert abs(float(loss.asnumpy()) - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    np.testing.assert_allclose(grad.asnumpy(), ref_grad, rtol=1e-4, atol=1e-7)


def test_large_logits_stay_finite_and_exact():
    logits, labels = _data(1, scale=1.0)
    logits[0, 0, :] += 80.0  # exp overflows float32 without the max shift
    logits[1, 2, labels[1, 2]] = 95.0
    ref_loss, ref_grad = reference(logits, labels)
    loss, grad = ms.value_and_grad(token_cross_entropy, 0)(Tensor(logits), Tensor(labels))
    assert np.isfinite(grad.asnumpy()).all()
    assert abs(float(loss.asnumpy()) - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    np.testing.assert_allclose(grad.asnumpy(), ref_grad, rtol=1e-4, atol=1e-7)


def test_step_loss_uses_fp32_for_half_precision_logits():
    logits, labels = _data(2)
    half = logits.astype(np.float16)
    ref_loss, _ = reference(half.astype(np.float32), labels)
    got = float(cross_entropy_loss(Tensor(half), Tensor(labels)).asnumpy())
    assert abs(got - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
