"""DPO / SimPO losses (train/preference.py pair_losses, sequence_logps) against float64 NumPy implementations of
the published formulas: Rafailov et al. 2023 eq. 7 (sigmoid, with conservative-DPO label smoothing), Azar et al.
2023 eq. 17 (IPO), SLiC-HF hinge (Zhao et al. 2023), Meng et al. 2024 eq. 6 (SimPO). Loss and gradient with
respect to the policy log-probabilities, 1e-6 relative; gradients written out by hand from the formulas."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_reference(kind, beta, eps, gamma, pw, pl, rw, rl, nw, nl):
    """(mean loss, d mean / d pw, d mean / d pl), float64."""
    b = len(pw)
    if kind == "simpo":
        z = beta * pw / nw - beta * pl / nl - gamma
        loss = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
        dz = -(1 - eps) * _sigmoid(-z) + eps * _sigmoid(z)
        return loss.mean(), dz * beta / nw / b, -dz * beta / nl / b
    h = (pw - rw) - (pl - rl)
    if kind == "sigmoid":
        loss = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
        dh = beta * (-(1 - eps) * _sigmoid(-beta * h) + eps * _sigmoid(beta * h))
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
        dh = 2 * (h - 1 / (2 * beta))
    else:
        loss = np.maximum(0.0, 1 - beta * h)
        dh = np.where(1 - beta * h > 0, -beta, 0.0)
    return loss.mean(), dh / b, -dh / b


@pytest.mark.parametrize("kind,beta,eps,gamma", [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.1, 0.0),
                                                 ("ipo", 0.1, 0.0, 0.0), ("hinge", 0.2, 0.0, 0.0),
                                                 ("simpo", 2.0, 0.0, 1.0), ("simpo", 2.5, 0.05, 0.5)])
def test_pair_loss_and_gradient_match_float64_numpy(kind, beta, eps, gamma):
    from ascend_llm.train.preference import pair_losses

    rng = np.random.default_rng(7)
    b = 16
    pw, pl = -rng.uniform(5, 60, b), -rng.uniform(5, 60, b)
    rw, rl = pw + rng.normal(0, 4, b), pl + rng.normal(0, 4, b)
    nw, nl = rng.integers(3, 40, b).astype(np.float64), rng.integers(3, 40, b).astype(np.float64)
    f32 = [Tensor(a.astype(np.float32)) for a in (pw, pl, rw, rl, nw, nl)]
    # the reference sees exactly the float32 inputs the MindSpore side gets
    pw, pl, rw, rl, nw, nl = (t.asnumpy().astype(np.float64) for t in f32)

    def mean_loss(a, c, *rest):
        return pair_losses(kind, beta, eps, gamma, a, c, *rest)[0].mean()

    loss = mean_loss(*f32).asnumpy()
    grad_w, grad_l = ms.grad(mean_loss, grad_position=(0, 1))(*f32)
    ref_loss, ref_w, ref_l = numpy_reference(kind, beta, eps, gamma, pw, pl, rw, rl, nw, nl)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    scale = np.abs(np.concatenate([ref_w, ref_l])).max()  # 1e-6 relative to the gradient's size
    np.testing.assert_allclose(grad_w.asnumpy(), ref_w, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(grad_l.asnumpy(), ref_l, rtol=1e-6, atol=1e-6 * scale)


def test_log_sigmoid_is_finite_far_out():
    from ascend_llm.train.preference import log_sigmoid

    x = np.array([-200.0, -30.0, 0.0, 30.0, 200.0], np.float32)
    np.testing.assert_allclose(log_sigmoid(Tensor(x)).asnumpy(), _log_sigmoid(x.astype(np.float64)), rtol=1e-6,
                               atol=1e-12)


def test_sequence_logps_sum_only_labelled_tokens():
    from ascend_llm.train.preference import sequence_logps

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (3, 5, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 5)).astype(np.int32)
    labels[0, :2] = -100
    labels[2, :] = -100
    total, count = sequence_logps(Tensor(logits), Tensor(labels))
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    mask = labels != -100
    picked = np.take_along_axis(logp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(total.asnumpy(), (picked * mask).sum(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(count.asnumpy(), mask.sum(-1))


def test_average_logps_is_trls_per_token_ipo():
    """objective.preference.average_logps: h from per-token mean log-probabilities (policy and reference each
    divided by the response's token count, TRL's loss_type=ipo), L = (h - 1/(2 beta))^2, against float64 NumPy
    on the log-softmax of fixed logits; the summed form (the default) gives another loss."""
    from mindspore import nn

    from ascend_llm.train.preference import PreferenceObjective

    rng = np.random.default_rng(5)
    b, s, v = 3, 6, 9
    logits = rng.normal(0, 2, (2 * b, s, v)).astype(np.float32)
    labels = rng.integers(0, v, (2 * b, s)).astype(np.int32)
    labels[:, :2] = -100
    labels[1, 2:4] = -100  # unequal response lengths
    ref = -rng.uniform(3, 9, 2 * b).astype(np.float32)

    class Fixed(nn.Cell):
        def construct(self, tokens):
            return Tensor(logits)

    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    mask = labels != -100
    summed = (np.take_along_axis(logp, np.where(mask, labels, 0)[..., None], -1)[..., 0] * mask).sum(-1)
    count = mask.sum(-1)
    batch = (Tensor(np.zeros((2 * b, s), np.int32)), Tensor(labels), Tensor(ref))
    for average in (True, False):
        pi, r = (summed / count, ref / count) if average else (summed, ref.astype(np.float64))
        h = (pi[:b] - r[:b]) - (pi[b:] - r[b:])
        expected = np.mean((h - 1 / (2 * 0.1)) ** 2)
        objective = PreferenceObjective("ipo", 0.1, reference_mode="cached", average_logps=average)
        loss, aux = objective.loss(Fixed(), *batch)
        np.testing.assert_allclose(float(loss.asnumpy()), expected, rtol=1e-6)
        np.testing.assert_allclose(float(aux[0].asnumpy()), 0.1 * np.mean(pi[:b] - r[:b]), rtol=1e-5, atol=1e-7)
