"""Contrastive losses and their gradients against float64 NumPy (the formulas of Radford et al. 2021, Zhai et al.
2023 and PyTorch's CosineEmbeddingLoss for the seed's cosine aligner, differentiated by central differences), and
retrieval recall on constructed embeddings."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from ascend_llm.models.clip import l2_normalize
from ascend_llm.train.contrastive import clip_loss, cosine_loss, retrieval_recall, same_caption, siglip_loss

COSINE = {"cosine": (True, 0.0), "cosine_margin": (True, 0.1), "cosine_matched": (False, 0.0)}
CAPTION_KEYS = [0, 1, 2, 3, 1, 4]  # texts 1 and 4 are the same caption: (1, 4) and (4, 1) are matched pairs too
IDS = np.array([[7, 3, 9, 9], [5, 2, 1, 1], [5, 2, 1, 0], [4, 4, 4, 4], [5, 2, 1, 1], [7, 3, 9, 0]], np.int32)


def np_loss(kind: str, image, text, scale, bias) -> float:
    """float64 reference: L2-normalise, logits_per_text = exp(scale) t i^T (+ bias), then the loss."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    if kind in COSINE:  # torch.nn.CosineEmbeddingLoss(margin): its mean over y = +1 pairs plus over y = -1 pairs
        negatives, margin = COSINE[kind]
        cos, keys, n = text @ image.T, CAPTION_KEYS, len(text)
        pairs = [(i, j) for i in range(n) for j in range(n)]
        loss = np.mean([1 - cos[i, j] for i, j in pairs if keys[i] == keys[j]])
        others = [max(0.0, cos[i, j] - margin) for i, j in pairs if keys[i] != keys[j]]
        return float(loss + (np.mean(others) if negatives else 0.0))
    logits = np.exp(scale) * text @ image.T
    n = len(logits)
    if kind == "clip":
        def ce(z):
            z = z - z.max(1, keepdims=True)
            return -np.mean(np.diag(z) - np.log(np.exp(z).sum(1)))
        return (ce(logits) + ce(logits.T)) / 2
    z = 2 * np.eye(n) - 1
    x = z * (logits + bias)
    return -np.sum(np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))) / n


def np_grads(kind, image, text, scale, bias, h=1e-6):
    values = [image, text, np.array([scale]), np.array([bias])]
    grads = []
    for index, value in enumerate(values):
        grad = np.zeros_like(value)
        for pos in np.ndindex(value.shape):
            up, down = [v.copy() for v in values], [v.copy() for v in values]
            up[index][pos] += h
            down[index][pos] -= h
            grad[pos] = (np_loss(kind, up[0], up[1], up[2][0], up[3][0]) -
                         np_loss(kind, down[0], down[1], down[2][0], down[3][0])) / (2 * h)
        grads.append(grad)
    return grads


def ms_loss(kind):
    if kind in COSINE:
        matched = same_caption(Tensor(IDS))
        return lambda image, text, scale, bias: cosine_loss(ops.matmul(l2_normalize(text), l2_normalize(image).T),
                                                            matched, *COSINE[kind])
    loss_fn = clip_loss if kind == "clip" else siglip_loss

    def fn(image, text, scale, bias):
        logits = ops.exp(scale) * ops.matmul(l2_normalize(text), l2_normalize(image).T)
        return loss_fn(logits + bias if kind == "siglip" else logits)

    return fn


@pytest.mark.parametrize("kind", ["clip", "siglip", *COSINE])
def test_loss_and_gradients_equal_float64_numpy(kind):
    rng = np.random.default_rng(3)
    image, text = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    text[2] = image[2] + 0.1 * text[2]  # one aligned pair, so the loss is not at a symmetric point
    scale, bias = np.log(10.0), -2.0
    inputs = [Tensor(image.astype(np.float32)), Tensor(text.astype(np.float32)),
              Tensor(np.array([scale], np.float32)), Tensor(np.array([bias], np.float32))]
    value, grads = ms.value_and_grad(ms_loss(kind), grad_position=(0, 1, 2, 3))(*inputs)
    assert abs(float(value.asnumpy()) - np_loss(kind, image, text, scale, bias)) < 1e-5
    for got, want, name in zip(grads, np_grads(kind, image, text, scale, bias), ("image", "text", "scale", "bias")):
        np.testing.assert_allclose(got.asnumpy().reshape(want.shape), want, atol=1e-5, rtol=1e-4, err_msg=name)
    if kind != "siglip":  # the bias does not enter CLIP's loss, neither bias nor scale the cosine loss
        assert float(np.abs(grads[3].asnumpy()).max()) == 0.0
    if kind in COSINE:
        assert float(np.abs(grads[2].asnumpy()).max()) == 0.0


def test_clip_loss_is_symmetric_cross_entropy_with_a_wrong_reference_failing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 4)).astype(np.float32)
    got = float(clip_loss(Tensor(logits)).asnumpy())
    rows = -np.mean(np.diag(logits) - np.log(np.exp(logits.astype(np.float64)).sum(1)))
    cols = -np.mean(np.diag(logits) - np.log(np.exp(logits.astype(np.float64)).sum(0)))
    assert abs(got - (rows + cols) / 2) < 1e-6
    assert abs(got - rows) > 1e-3  # a one-sided loss would be told apart


def test_retrieval_recall_perfect_shuffled_and_duplicates():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(20, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    captions = [f"caption {i}" for i in range(20)]
    perfect = retrieval_recall(emb, emb, captions, ks=(1, 5))
    assert perfect["i2t_recall@1"] == perfect["t2i_recall@1"] == 100.0
    assert perfect["i2t_chance@1"] == pytest.approx(5.0) and perfect["t2i_chance@5"] == pytest.approx(25.0)
    shifted = retrieval_recall(emb, np.roll(emb, 1, axis=0), captions, ks=(1,))
    assert shifted["i2t_recall@1"] == shifted["t2i_recall@1"] == 0.0
    # two classes of ten identical captions: an image counts as found when its class's caption ranks first
    classes = [f"class {i % 2}" for i in range(20)]
    centres = np.stack([emb[i % 2] for i in range(20)])
    result = retrieval_recall(centres + 0.01 * emb, centres, classes, ks=(1,))
    assert result["i2t_recall@1"] == 100.0 and result["i2t_chance@1"] == 50.0
    assert result["t2i_chance@1"] == pytest.approx(50.0)
