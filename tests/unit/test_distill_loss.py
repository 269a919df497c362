"""The distillation objective: loss and gradient against float64 NumPy, chunking, the kd_ratio=0 / tau=1 reduction
to plain cross-entropy, and a frozen teacher opened through the model opener."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import ConfigError
from ascend_llm.models.llama import build_model
from ascend_llm.train.distill import Distillation, open_teacher
from ascend_llm.train.objective import LanguageModeling
from ascend_llm.train.step import cross_entropy_loss, masked_cross_entropy_loss
from tests.conftest import ROOT

pytestmark = pytest.mark.xdist_group("distill_loss")  # one xdist worker: module fixtures build once

FIXTURE = ROOT.parent / "shared" / "fixtures" / "hf" / "llama_gqa"  # vocab 640


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(s, t, labels, ratio, tau):
    """float64 loss and d loss / d s of (1 - r) CE + r tau^2 mean_{labels != -100} KL(p_t || q_s) at tau."""
    s, t = s.reshape(-1, s.shape[-1]).astype(np.float64), t.reshape(-1, t.shape[-1]).astype(np.float64)
    y = labels.reshape(-1)
    keep = y != -100
    n = keep.sum()
    log_q, log_p = _log_softmax(s / tau), _log_softmax(t / tau)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    log_s = _log_softmax(s)
    ce = -log_s[keep, y[keep]].mean()
    loss = (1 - ratio) * ce + ratio * tau * tau * kl[keep].sum() / n
    onehot = np.zeros_like(s)
    onehot[np.flatnonzero(keep), y[keep]] = 1.0
    d_ce = (np.exp(log_s) - onehot) * keep[:, None] / n
    d_kl = (np.exp(log_q) - np.exp(log_p)) * keep[:, None] / tau / n
    return loss, (1 - ratio) * d_ce + ratio * tau * tau * d_kl


def _grad_of_combine(objective, s, t, labels):
    logits = Parameter(Tensor(s), name="logits")

    def f(teacher_logits, y):
        return objective.combine(logits, teacher_logits, y)[0]

    loss, grads = ms.value_and_grad(f, None, [logits])(Tensor(t), Tensor(labels))
    return float(loss.asnumpy()), grads[0].asnumpy().reshape(-1, s.shape[-1])


@pytest.mark.parametrize("ratio,tau,chunk,masked", [(0.5, 2.0, 7, False), (0.3, 1.0, 1024, False),
                                                    (1.0, 4.0, 5, True)])
def test_loss_and_gradient_match_float64(ratio, tau, chunk, masked):
    rng = np.random.default_rng(7)
    s = rng.normal(0, 3, (2, 12, 50)).astype(np.float32)
    t = rng.normal(0, 3, (2, 12, 50)).astype(np.float32)
    labels = rng.integers(0, 50, (2, 12)).astype(np.int32)
    if masked:
        labels[0, :5] = -100
    lm = masked_cross_entropy_loss if masked else cross_entropy_loss
    objective = Distillation(None, lm, ratio, tau, chunk)
    loss, grad = _grad_of_combine(objective, s, t, labels)
    ref_loss, ref_grad = reference(s, t, labels, ratio, tau)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad) < 1e-6
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6 * np.abs(ref_grad).max())


def test_chunking_does_not_change_the_result():
    rng = np.random.default_rng(3)
    s, t = rng.normal(0, 2, (3, 10, 40)).astype(np.float32), rng.normal(0, 2, (3, 10, 40)).astype(np.float32)
    labels = rng.integers(0, 40, (3, 10)).astype(np.int32)
    whole = _grad_of_combine(Distillation(None, cross_entropy_loss, 0.7, 2.0, 4096), s, t, labels)
    chunked = _grad_of_combine(Distillation(None, cross_entropy_loss, 0.7, 2.0, 4), s, t, labels)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-6)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def teacher():
    if not FIXTURE.is_dir():
        pytest.skip(f"shared fixture absent: {FIXTURE}")
    return open_teacher(str(FIXTURE), 640)


def _student():
    cfg = ModelConfig(name="student", vocab_size=640, dim=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      ffn_hidden_dim=64, max_seq_len=64)
    return build_model(cfg, seed=1)


def test_kd_ratio_zero_tau_one_is_plain_cross_entropy_exactly(teacher):
    """Through the model and the compiled step's value_and_grad: the same loss and parameter gradients, bit for
    bit, as the LanguageModeling objective (the teacher runs, its term is multiplied by 0)."""
    student = _student()
    params = student.trainable_params()
    rng = np.random.default_rng(0)
    x = Tensor(rng.integers(0, 640, (2, 16)).astype(np.int32))
    y = Tensor(rng.integers(0, 640, (2, 16)).astype(np.int32))
    results = []
    def loss_of(objective):
        def f(a, b):
            return objective.loss(student, a, b)[0]

        return f

    for objective in (LanguageModeling(cross_entropy_loss), Distillation(teacher, cross_entropy_loss, 0.0, 1.0, 8)):
        loss, grads = ms.jit(ms.value_and_grad(loss_of(objective), None, params))(x, y)
        results.append((loss.asnumpy(), [g.asnumpy() for g in grads]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def pynative_mode():
    """Eager for a comparison of values (two cells called on their own would compile two graphs); the compiled
    step is test_kd_ratio_zero_tau_one_is_plain_cross_entropy_exactly's and
    test_a_quantized_teacher_runs_in_the_step's."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=mode)


def test_teacher_is_frozen_and_matches_its_own_forward(teacher, pynative_mode):
    assert all(not p.requires_grad for p in teacher.get_parameters())
    assert all(p.name.startswith("teacher.") for p in teacher.get_parameters())
    student = _student()
    objective = Distillation(teacher, cross_entropy_loss, 1.0, 1.0, 16)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 640, (1, 16)).astype(np.int32)
    y = rng.integers(0, 640, (1, 16)).astype(np.int32)
    _, (ce, kd) = objective.loss(student, Tensor(x), Tensor(y))
    s, t = student(Tensor(x)).asnumpy(), teacher(Tensor(x)).asnumpy()
    ref_kd, _ = reference(s, t, y, 1.0, 1.0)
    assert float(kd.asnumpy()) == pytest.approx(ref_kd, rel=1e-5)
    assert float(ce.asnumpy()) == pytest.approx(reference(s, t, y, 0.0, 1.0)[0], rel=1e-5)


def test_teacher_with_another_vocabulary_is_refused(teacher):
    with pytest.raises(ConfigError, match="vocab_size=640"):
        open_teacher(str(FIXTURE), 4096)


def test_a_quantized_teacher_runs_in_the_step(teacher, tmp_path):
    """An int8 RTN copy of the teacher (ascend-llm quantize) opens through the same path and its KD term equals the
    NumPy KL of its own logits."""
    from ascend_llm.cli.main import main

    assert main(["quantize", str(FIXTURE), "--out", str(tmp_path / "q8"), "--bits", "8"]) == 0
    quantized = open_teacher(str(tmp_path / "q8"), 640)
    student = _student()
    objective = Distillation(quantized, cross_entropy_loss, 1.0, 2.0, 16)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 640, (1, 16)).astype(np.int32)
    _, (_, kd) = objective.loss(student, Tensor(x), Tensor(x))
    # called as objective.loss calls them (tokens, segment_ids=None): the graphs it compiled run again
    s, t = student(Tensor(x), None).asnumpy(), quantized(Tensor(x), None).asnumpy()
    assert float(kd.asnumpy()) == pytest.approx(reference(s, t, x, 1.0, 2.0)[0], rel=1e-5)


def test_recipe_errors_name_the_field():
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.distill import build_objective

    with pytest.raises(ConfigError, match="objective.distill.teacher"):
        compose_recipe(["objective=distill"])
    with pytest.raises(ConfigError, match="objective.distill.kd_ratio"):
        compose_recipe(["objective=distill", f"objective.distill.teacher={FIXTURE}", "objective.distill.kd_ratio=1.5"])
    if not FIXTURE.is_dir():
        pytest.skip(f"shared fixture absent: {FIXTURE}")
    recipe = compose_recipe(["model=debug", "model.vocab_size=640", "objective=distill",
                             f"objective.distill.teacher={FIXTURE}"])
    with pytest.raises(ConfigError, match="data.tokenizer"):  # the student must read the teacher's tokenizer
        build_objective(recipe, cross_entropy_loss)
    recipe.data.tokenizer = str(FIXTURE.parent / "qwen2_tied" / "tokenizer.json")
    with pytest.raises(ConfigError, match="differs from the teacher's"):
        build_objective(recipe, cross_entropy_loss)
    recipe.parallel.tensor_parallel_degree = 2
    with pytest.raises(ConfigError, match="parallel.tensor_parallel_degree"):
        build_objective(recipe, cross_entropy_loss)
