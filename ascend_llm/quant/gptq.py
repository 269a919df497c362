"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323), Algorithm 1, in float64 NumPy.

For a Dense weight W (out, in) with calibration inputs X (n, in) it minimises ||W X^T - Q X^T||^2 column by
column: H = 2/n X^T X, dead columns (diag(H) = 0) are zeroed, H += damp * mean(diag(H)) * I, and with U the
upper Cholesky factor of H^-1, each column i is quantized and its error (w_i - q_i) / U_ii spread over the
later columns by U_i,i+1: (the row of the OBS update). Updates are applied lazily per block of `block_size`
columns (Section 3, step 2). Optional act-order processes columns by descending diag(H); the group of column
j (in processing order) is j // group_size, recorded as g_idx in the original order (AutoGPTQ `desc_act`).
Group grids are computed when the group's first column is reached, from the weights as updated so far
(pending lazy updates included, so the result does not depend on block_size).
"""

from __future__ import annotations

import numpy as np

from ascend_llm.config.quant import QuantConfig
from ascend_llm.quant.rtn import QuantizedWeight, effective_group_size, grid_params, num_groups, quantize_columns


class HessianAccumulator:
    """Running H = 2/n * sum_t x_t x_t^T over calibration rows x_t (in,), float64 (in, in)."""

    def __init__(self, in_features: int):
        self.hessian = np.zeros((in_features, in_features), np.float64)
        self.num_rows = 0

    def add(self, x: np.ndarray) -> None:
        """x (..., in) activations entering the layer (any float dtype); leading axes are flattened."""
        x = np.asarray(x, np.float64).reshape(-1, self.hessian.shape[0])
        total = self.num_rows + x.shape[0]
        self.hessian *= self.num_rows / total
        x = np.sqrt(2.0 / total) * x
        self.hessian += x.T @ x
        self.num_rows = total


def _inverse_cholesky(hessian: np.ndarray, damp_percent: float) -> np.ndarray:
    h = hessian.copy()
    h[np.diag_indices_from(h)] += damp_percent * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T  # upper U with H^-1 = U^T U


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, cfg: QuantConfig) -> QuantizedWeight:
    """GPTQ-quantize weight (out, in) given the layer-input Hessian (in, in); returns codes in the original
    column order (g_idx set when act_order permutes the groups). LinAlgError if H + damping is not positive
    definite (raise damp_percent)."""
    w = np.array(weight, np.float64)
    h = np.array(hessian, np.float64)
    out_f, in_f = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if cfg.act_order else np.arange(in_f)
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    u = _inverse_cholesky(h, cfg.damp_percent)
    size = effective_group_size(cfg.group_size, in_f)
    groups = num_groups(in_f, cfg.group_size)
    codes = np.empty((out_f, in_f), np.uint8)
    scales = np.empty((out_f, groups), np.float16)
    zeros = np.empty((out_f, groups), np.uint8)
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:
                g = col // size
                current = _group_weights(w, w1, err1, u, i1, i2, i, min(col + size, in_f))
                scales[:, g], zeros[:, g] = grid_params(current, cfg.bits, cfg.sym)
            g = col // size
            q = quantize_columns(w1[:, i], scales[:, g], zeros[:, g], cfg.bits)
            codes[:, col] = q
            deq = scales[:, g].astype(np.float64) * (q.astype(np.float64) - zeros[:, g])
            err = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inverse = np.argsort(perm)
    g_idx = (inverse // size).astype(np.int32) if cfg.act_order else None
    return QuantizedWeight(codes[:, inverse], scales, zeros, cfg.bits, cfg.group_size, cfg.sym, g_idx)


def _group_weights(w, w1, err1, u, i1, i2, i, end):
    """Current (fully updated) weights of processing-order columns [i1 + i, end): the block part from w1, the
    part beyond the block from w with the block's pending lazy updates applied."""
    inside = w1[:, i:min(end, i2) - i1]
    if end <= i2:
        return inside
    beyond = w[:, i2:end] - err1[:, :i] @ u[i1:i1 + i, i2:end]
    return np.concatenate([inside, beyond], axis=1)
