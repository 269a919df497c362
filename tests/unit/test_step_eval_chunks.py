"""Row-chunked evaluation (train/step.py `row_chunked`): the weighted mean of chunk means equals the
whole-batch mean token cross-entropy, computed here in float64 NumPy; an objective's extra scalars (the
tuple after the loss) are combined the same way."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.train.step import row_chunked


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, labels[..., None], -1).mean())


def make_batch(rows: int, seq: int = 5, vocab: int = 7):
    rng = np.random.default_rng(rows)
    logits = rng.standard_normal((rows, seq, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
    return logits, labels


def loss_of_rows(calls: list):
    """A stand-in for the compiled eval: its "model" is the identity on precomputed logits (x), and it records
    the row counts it was called with."""

    def fn(x, y, segment_ids=None):
        calls.append(x.shape[0])
        accuracy = float((x.asnumpy().argmax(-1) == y.asnumpy()).mean())  # an extra scalar beside the loss
        return Tensor(np.float32(numpy_cross_entropy(x.asnumpy(), y.asnumpy()))), Tensor(np.float32(accuracy))

    return fn


@pytest.mark.parametrize("rows, chunk", [(8, 1), (7, 3), (4, 4), (2, 8)])
def test_chunked_mean_equals_whole_batch_mean(rows, chunk):
    logits, labels = make_batch(rows)
    calls = []
    loss, accuracy = row_chunked(loss_of_rows(calls), chunk)(Tensor(logits), Tensor(labels))
    assert float(loss.asnumpy()) == pytest.approx(numpy_cross_entropy(logits, labels), rel=1e-6)
    assert float(accuracy.asnumpy()) == pytest.approx(float((logits.argmax(-1) == labels).mean()), rel=1e-6)
    expected_calls = [min(chunk, rows - s) for s in range(0, rows, chunk)]
    assert calls == expected_calls


def test_document_masked_batches_run_whole():
    logits, labels = make_batch(6)
    calls = []
    segments = Tensor(np.zeros((6, 5), np.int32))
    row_chunked(loss_of_rows(calls), 1)(Tensor(logits), Tensor(labels), segments)
    assert calls == [6]
