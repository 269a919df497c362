"""`apply_quantization`: swap a model's Dense cells (selected by stable names) for QuantLinear, by RTN or GPTQ.

GPTQ runs block by block (the GPTQ paper's sequential scheme): the calibration windows go through the model
with the earlier blocks already quantized, the inputs of the current block's Dense cells are captured (in
PyNative mode, through a recording wrapper), each layer's Hessian 2/n X^T X is accumulated, and the block's
layers are quantized with `gptq_quantize`. The output head (when included) comes last.
"""

from __future__ import annotations

import fnmatch
import logging
import re

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ascend_llm.config.quant import QuantConfig
from ascend_llm.errors import ConfigError
from ascend_llm.quant.gptq import HessianAccumulator, gptq_quantize
from ascend_llm.quant.linear import QuantLinear
from ascend_llm.quant.rtn import QuantizedWeight, quantize_rtn

logger = logging.getLogger("ascend_llm.quant")


def quant_candidates(model: nn.Cell, cfg: QuantConfig) -> list[str]:
    """Cell paths of the nn.Dense layers to quantize: leaf or path matching cfg.include, plus `output` when
    cfg.include_output. int4 needs an even in_features (two codes per byte)."""
    from ascend_llm.models.moe import GroupedLinear

    found = []
    for path, cell in model.cells_and_names():
        if not path or not isinstance(cell, (nn.Dense, GroupedLinear)):  # MoE experts: (E, out, in) stacked
            continue
        leaf = path.rsplit(".", 1)[-1]
        wanted = (path == "output" and cfg.include_output) or (path != "output" and any(
            fnmatch.fnmatchcase(leaf, p) or fnmatch.fnmatchcase(path, p) for p in cfg.include))
        if not wanted:
            continue
        if cfg.bits == 4 and cell.weight.shape[-1] % 2:
            raise ConfigError("quant.bits", 4, f"{path} has odd in_features={cell.weight.shape[-1]}: use bits=8")
        found.append(path)
    return found


def _replace(model: nn.Cell, path: str, qw: QuantizedWeight, dense: nn.Dense) -> None:
    from ascend_llm.precision.policy import replace_cell

    bias = dense.bias.asnumpy() if getattr(dense, "has_bias", False) else None
    layer = QuantLinear(qw, bias)
    layer.stacked_2d = dense.weight.ndim == 3  # MoE experts: (E * out, in) rows, models/moe.py expert_weight_of
    replace_cell(model, path, layer)


def expert_rows(weight: np.ndarray) -> np.ndarray:
    """A Dense (out, in) weight as it is, MoE experts (E, out, in) as one (E * out, in) matrix: quantization
    groups run along the input axis, row by row, so this quantizes every expert like its own linear layer."""
    return weight.reshape(-1, weight.shape[-1])


class _Recorder(nn.Cell):
    """PyNative-only wrapper that feeds the layer's input rows to a Hessian accumulator, then runs the layer."""

    def __init__(self, dense: nn.Dense, accumulator: HessianAccumulator):
        super().__init__()
        self.dense, self.accumulator = dense, accumulator

    def construct(self, x):
        self.accumulator.add(x.asnumpy())
        return self.dense(x)


def _stage_of(path: str) -> str:
    match = re.match(r"(layers\.\d+)\.", path)
    return match.group(1) if match else path


def _gptq_stage(model, paths, cells, calibration, cfg, batch_size) -> dict[str, QuantizedWeight]:
    from ascend_llm.precision.policy import replace_cell
    from ascend_llm.quant.experts import ExpertRecorder, quantize_recorded, recorders_for

    experts = [p for p in paths if cells[p].weight.ndim == 3]  # MoE: per-expert Hessians (quant/experts.py)
    paths = [p for p in paths if p not in experts]
    recorded = recorders_for(cells, experts)
    accumulators = {p: HessianAccumulator(cells[p].weight.shape[1]) for p in paths}
    for p in paths:
        replace_cell(model, p, _Recorder(cells[p], accumulators[p]))
    for parent, (cell, inputs, hidden) in recorded.items():
        replace_cell(model, parent, ExpertRecorder(cell, inputs, hidden))
    try:
        for start in range(0, len(calibration), batch_size):
            model(Tensor(calibration[start:start + batch_size].astype(np.int32)))
    finally:
        for p in paths:
            replace_cell(model, p, cells[p])
        for parent, (cell, _, _) in recorded.items():
            replace_cell(model, parent, cell)
    done = {p: gptq_quantize(cells[p].weight.asnumpy(), accumulators[p].hessian, cfg) for p in paths}
    return {**done, **quantize_recorded(cells, experts, recorded, cfg)}


def apply_quantization(model: nn.Cell, cfg: QuantConfig, calibration: np.ndarray | None = None,
                       batch_size: int = 8) -> dict[str, QuantizedWeight]:
    """Quantize the selected Dense layers in place; returns {cell path: QuantizedWeight}.

    calibration: (num_samples, seq_len) int token ids, required for method="gptq" (ConfigError otherwise).
    The model must take (B, T) int32 tokens. Parameter names keep their full paths (`<path>.qweight`, ...).
    """
    from ascend_llm.precision.policy import sync_parameter_names

    cfg.validate()
    paths = quant_candidates(model, cfg)
    cells = dict(model.cells_and_names())
    done: dict[str, QuantizedWeight] = {}
    if cfg.method == "rtn":
        for p in paths:
            done[p] = quantize_rtn(expert_rows(cells[p].weight.asnumpy()), cfg)
            _replace(model, p, done[p], cells[p])
    else:
        if calibration is None or len(calibration) == 0:
            raise ConfigError("quant.method", "gptq", "needs calibration samples (a corpus to draw them from)")
        stages: dict[str, list[str]] = {}
        for p in paths:
            stages.setdefault(_stage_of(p), []).append(p)
        mode = ms.get_context("mode")
        ms.set_context(mode=ms.PYNATIVE_MODE)
        try:
            for stage, members in stages.items():
                result = _gptq_stage(model, members, cells, calibration, cfg, batch_size)
                for p, qw in result.items():
                    _replace(model, p, qw, cells[p])
                done.update(result)
                logger.info("GPTQ: quantized %s (%d layers)", stage, len(members))
        finally:
            ms.set_context(mode=mode)
    sync_parameter_names(model)
    return done


def quantized_layers(model: nn.Cell) -> dict[str, QuantLinear]:
    return {path: cell for path, cell in model.cells_and_names() if isinstance(cell, QuantLinear)}


def weight_bytes(model: nn.Cell) -> dict[str, int]:
    """{"quantized": bytes of QuantLinear weight state, "quantized_fp32": the same weights' float32 bytes,
    "other": bytes of every other parameter (embeddings, norms, biases, unquantized layers)}."""
    qcells = quantized_layers(model)
    qparams = {id(p) for cell in qcells.values() for p in cell.get_parameters() if p is not cell.bias}
    other = sum(p.asnumpy().nbytes for p in model.get_parameters() if id(p) not in qparams)
    return {"quantized": sum(c.weight_bytes() for c in qcells.values()),
            "quantized_fp32": sum(4 * c.in_channels * c.out_channels for c in qcells.values()),
            "other": other}
