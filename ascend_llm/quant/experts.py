"""GPTQ for Mixture-of-Experts experts (models/moe.py GroupedExperts): each expert is its own linear layers.

During a GPTQ stage (quant/apply.py) the layer's experts cell is wrapped by `ExpertRecorder`, which sees the
flattened tokens x (N, H) and their routed expert ids (N, k): expert e's gate/up projections (w1, w3) get the
Hessian 2/n X_e^T X_e of the tokens routed to e, its down projection (w2) that of its hidden activations
silu(X_e w1_e^T) * (X_e w3_e^T) (float weights of the same stage, as GPTQ's per-layer capture does for dense
layers). Each expert's (out, in) weight is then quantized by `gptq_quantize` with its own Hessian, and the E
results are stacked into one (E * out, in) QuantizedWeight (quant/apply.py `expert_rows`). An expert that no
calibration token reached has no Hessian and is quantized by RTN. act_order permutes each expert's columns
differently, which one stacked layer cannot express: with act_order the experts are quantized by RTN (logged).
"""

from __future__ import annotations

import logging

import numpy as np
from mindspore import nn

from ascend_llm.config.quant import QuantConfig
from ascend_llm.quant.gptq import HessianAccumulator, gptq_quantize
from ascend_llm.quant.rtn import QuantizedWeight, quantize_rtn

logger = logging.getLogger("ascend_llm.quant")
PROJECTIONS = ("w1", "w2", "w3")


class ExpertRecorder(nn.Cell):
    """PyNative-only wrapper of a GroupedExperts: accumulates per-expert Hessians (module docstring), then runs
    the experts. inputs / hidden: one HessianAccumulator per expert (in = H, and in = I)."""

    def __init__(self, experts: nn.Cell, inputs: list[HessianAccumulator], hidden: list[HessianAccumulator]):
        super().__init__()
        self.experts, self.inputs, self.hidden = experts, inputs, hidden

    def construct(self, x, weights, indices):
        xs, ids = x.asnumpy().astype(np.float64), indices.asnumpy()
        w1, w3 = (getattr(self.experts, n).weight.asnumpy().astype(np.float64) for n in ("w1", "w3"))
        for e in range(len(self.inputs)):
            rows = xs[(ids == e).any(axis=1)]
            if len(rows):
                self.inputs[e].add(rows)
                gate, up = rows @ w1[e].T, rows @ w3[e].T
                self.hidden[e].add(gate / (1.0 + np.exp(-gate)) * up)
        return self.experts(x, weights, indices)


def stack_quantized(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """One (E * out, in) QuantizedWeight from E (out, in) ones with the same grid (no g_idx): rows concatenated."""
    first = parts[0]
    return QuantizedWeight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                           np.concatenate([p.zeros for p in parts]), first.bits, first.group_size, first.sym, None)


def quantize_experts(weight: np.ndarray, hessians: list[HessianAccumulator], cfg: QuantConfig) -> QuantizedWeight:
    """weight (E, out, in) -> the stacked QuantizedWeight: expert e by GPTQ with hessians[e] (RTN when it saw no
    token, or for every expert with act_order)."""
    if cfg.act_order:
        return quantize_rtn(weight.reshape(-1, weight.shape[-1]), cfg)
    return stack_quantized([gptq_quantize(w, acc.hessian, cfg) if acc.num_rows else quantize_rtn(w, cfg)
                            for w, acc in zip(weight, hessians)])


def recorders_for(cells: dict, paths: list[str]) -> dict[str, tuple]:
    """{experts cell path: (cell, input accumulators, hidden accumulators)} for the expert weight paths of a stage
    (`<experts>.w1` / `.w2` / `.w3`)."""
    out = {}
    for path in paths:
        parent = path.rsplit(".", 1)[0]
        if parent in out:
            continue
        experts = cells[parent]
        num, hidden, dim = experts.w1.weight.shape
        out[parent] = (experts, [HessianAccumulator(dim) for _ in range(num)],
                       [HessianAccumulator(hidden) for _ in range(num)])
    return out


def quantize_recorded(cells: dict, paths: list[str], recorded: dict[str, tuple],
                      cfg: QuantConfig) -> dict[str, QuantizedWeight]:
    """The stacked QuantizedWeight of every expert weight path, from the Hessians its experts cell recorded."""
    if cfg.act_order and paths:
        logger.warning("GPTQ: act_order permutes each expert's columns differently; %d MoE expert weights "
                       "quantized by RTN", len(paths))
    out = {}
    for path in paths:
        parent, name = path.rsplit(".", 1)
        _, inputs, hidden = recorded[parent]
        out[path] = quantize_experts(cells[path].weight.asnumpy(), hidden if name == "w2" else inputs, cfg)
    return out
