"""The element-wise tuple maps of train/each.py, compiled and eager, against float64 NumPy."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.optim.each import add_each, scale_each, square_sum


def tensors(seed: int):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(3, 5)), rng.normal(size=(7,)), rng.normal(size=(2, 2, 2)) * 10]
    dtypes = [np.float32, np.float16, np.float32]
    return arrays, tuple(Tensor(a.astype(d)) for a, d in zip(arrays, dtypes))


def rounded(arrays, ts):
    return [a.astype(t.asnumpy().dtype).astype(np.float64) for a, t in zip(arrays, ts)]


@pytest.mark.parametrize("compiled", [True, False])
def test_scale_and_add_each_keep_dtypes_and_match_numpy(compiled):
    arrays, ts = tensors(0)
    other_arrays, others = tensors(1)

    def run(ts, others, factor):
        return scale_each(ts, factor), add_each(ts, others)

    fn = ms.jit(run) if compiled else run
    scaled, summed = fn(ts, others, Tensor(np.float32(0.25)))
    for i, (a, b) in enumerate(zip(rounded(arrays, ts), rounded(other_arrays, others))):
        assert scaled[i].dtype == ts[i].dtype and summed[i].dtype == ts[i].dtype
        tol = 1e-3 if ts[i].dtype == ms.float16 else 1e-6
        np.testing.assert_allclose(scaled[i].asnumpy(), a * 0.25, rtol=tol, atol=tol)
        np.testing.assert_allclose(summed[i].asnumpy(), a + b, rtol=tol, atol=tol)


@pytest.mark.parametrize("compiled", [True, False])
def test_square_sum_weights_each_tensor(compiled):
    arrays, ts = tensors(2)
    exact = [float((a ** 2).sum()) for a in rounded(arrays, ts)]

    def run(ts):
        return square_sum(ts), square_sum(ts, (0.0, 1.0, 0.5))

    fn = ms.jit(run) if compiled else run
    plain, weighted = fn(ts)
    assert plain.dtype == ms.float32 and plain.shape == ()
    np.testing.assert_allclose(float(plain.asnumpy()), sum(exact), rtol=1e-6)
    np.testing.assert_allclose(float(weighted.asnumpy()), exact[1] + 0.5 * exact[2], rtol=1e-6)


def test_square_sum_leaves_out_weight_zero_tensors_entirely():
    """An inf in a tensor of weight 0 must not become 0 * inf = NaN (TP's replicated/sharded split)."""
    bad = (Tensor(np.array([np.inf, 1.0], np.float32)), Tensor(np.array([3.0, 4.0], np.float32)))

    def replicated_only(ts):
        return square_sum(ts, (0.0, 1.0))

    value = ms.jit(replicated_only)(bad)
    assert float(value.asnumpy()) == 25.0
    assert np.isinf(float(square_sum(bad).asnumpy()))
