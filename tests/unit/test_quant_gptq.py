"""GPTQ against an independent float64 NumPy implementation of the published algorithm in its unblocked
OBS form (Frantar et al. 2023, eq. 2-3: quantize column q, w -= (w_q - quant(w_q)) / [H^-1]_qq * [H^-1]_q,:,
then remove q from H^-1 by the Gaussian-elimination downdate), with no Cholesky and no lazy blocks; and
GPTQ's layer-output error below RTN's on correlated inputs."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.quant import QuantConfig
from ascend_llm.quant.gptq import HessianAccumulator, gptq_quantize
from ascend_llm.quant.rtn import dequantize, quantize_rtn


def grid(wg, bits, sym):
    maxq = 2 ** bits - 1
    if sym:
        amax = np.abs(wg).max(axis=1)
        s = np.where(amax == 0, 1.0, amax / (2 ** (bits - 1) - 1))
        s = np.maximum(s, 2.0 ** -14).astype(np.float16).astype(np.float64)
        return s, np.full_like(s, 2 ** (bits - 1))
    lo, hi = np.minimum(wg.min(axis=1), 0), np.maximum(wg.max(axis=1), 0)
    s = np.maximum(np.where(hi == lo, 1.0, (hi - lo) / maxq), 2.0 ** -14).astype(np.float16).astype(np.float64)
    return s, np.where(hi == lo, 0, np.clip(np.round(-lo / s), 0, maxq))


def reference_gptq(w, x, bits, group, sym, damp, act_order):
    w = w.astype(np.float64).copy()
    h = 2.0 / x.shape[0] * x.T @ x
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    n = w.shape[1]
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    h = h + damp * np.mean(np.diag(h)) * np.eye(n)
    hinv = np.linalg.inv(h)
    deq = np.zeros_like(w)
    codes = np.zeros(w.shape, np.int64)
    done = []
    for j, q in enumerate(order):
        if j % group == 0:
            s, z = grid(w[:, order[j:j + group]], bits, sym)
        c = np.clip(np.round(w[:, q] / s) + z, 0, 2 ** bits - 1)
        codes[:, q], deq[:, q] = c, s * (c - z)
        err = (w[:, q] - deq[:, q]) / hinv[q, q]
        rest = [k for k in order[j + 1:]]
        w[:, rest] -= np.outer(err, hinv[q, rest])
        hinv = hinv - np.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
        done.append(q)
    return codes, deq


def correlated_inputs(rng, n, d):
    mix = rng.normal(size=(d, d)) * (rng.random(d) < 0.3) + np.eye(d) * 0.1
    return rng.normal(size=(n, d)) @ mix * np.exp(rng.normal(0, 1, size=d))


@pytest.mark.parametrize("bits,group,sym,act_order,block", [
    (4, 16, True, False, 16), (4, 16, False, True, 8), (8, -1, True, False, 32), (4, 24, True, False, 20)])
def test_gptq_matches_unblocked_obs_reference(bits, group, sym, act_order, block):
    rng = np.random.default_rng(7)
    d, out_f = 64, 12
    x = correlated_inputs(rng, 400, d)
    x[:, 5] = 0.0  # a dead input column
    w = rng.normal(0, 0.05, size=(out_f, d))
    cfg = QuantConfig(bits=bits, group_size=group, sym=sym, act_order=act_order, block_size=block,
                      damp_percent=0.01)
    acc = HessianAccumulator(d)
    for chunk in np.array_split(x, 3):
        acc.add(chunk)
    qw = gptq_quantize(w, acc.hessian, cfg)
    codes, deq = reference_gptq(w, x, bits, d if group == -1 else group, sym, 0.01, act_order)
    np.testing.assert_array_equal(qw.codes, codes)
    np.testing.assert_allclose(dequantize(qw), deq, rtol=0, atol=1e-7)


def test_hessian_accumulator_equals_batch_formula():
    x = np.random.default_rng(3).normal(size=(50, 8))
    acc = HessianAccumulator(8)
    acc.add(x[:20])
    acc.add(x[20:].astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(acc.hessian, 2.0 / 50 * x.T @ x, rtol=1e-6)


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(11)
    d = 128
    x = rng.normal(size=(1024, 16)) @ rng.normal(size=(16, d)) + 0.1 * rng.normal(size=(1024, d))  # low rank
    w = rng.normal(0, 0.05, size=(32, d))
    acc = HessianAccumulator(d)
    acc.add(x)
    for act_order in (False, True):
        cfg = QuantConfig(bits=4, group_size=32, sym=True, act_order=act_order)
        err_gptq = np.linalg.norm((w - dequantize(gptq_quantize(w, acc.hessian, cfg))) @ x.T)
        err_rtn = np.linalg.norm((w - dequantize(quantize_rtn(w, cfg))) @ x.T)
        assert err_gptq < 0.5 * err_rtn, (act_order, err_gptq, err_rtn)
