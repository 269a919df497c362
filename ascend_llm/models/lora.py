"""LoRA (Hu et al. 2021, arXiv:2106.09685) as a converter: `apply_lora(model, cfg)` wraps the Dense sub-cells
named in `cfg.targets` (stable names: wq, wk, wv, wo, w1, w2, w3) so that y = base(x) + (alpha / r) B A dropout(x),
with A (r, in) ~ Normal(mean 0, std 1/r) and B (out, r) = 0 (the update starts at zero). The base weights are frozen:
only A and B are trainable, so the optimizer and the trainer's checkpoint (trainable parameters) hold only the
adapter. `merged_weights(model)` folds W + (alpha / r) B A back into plain Dense names for export.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.lora import TARGETS, LoraConfig  # noqa: F401 (re-exported)
from ascend_llm.errors import ConfigError
from ascend_llm.models.moe import GroupedLinear, GroupedLora


class LoraDense(nn.Cell):
    """base(x) + scaling * (dropout(x) @ A^T) @ B^T; x (..., in) -> (..., out) in base's output dtype."""

    def __init__(self, base: nn.Cell, rank: int, alpha: float, dropout: float, rng: np.random.Generator):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base = base
        for param in base.get_parameters():
            param.requires_grad = False
        self.lora_a = Parameter(Tensor(rng.normal(0.0, 1.0 / rank, (rank, in_features)).astype(np.float32)),
                                name="lora_a")
        self.lora_b = Parameter(Tensor(np.zeros((out_features, rank), np.float32)), name="lora_b")
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None

    def construct(self, x):
        """x (..., in) -> (..., out): base(x) plus the adapter term (computed in float32, cast to base's output
        dtype)."""
        y = self.base(x)
        h = self.dropout(x) if self.dropout is not None else x
        h = ops.matmul(h.astype(mstype.float32), self.lora_a.T)
        return y + (ops.matmul(h, self.lora_b.T) * self.scaling).astype(y.dtype)


def apply_lora(model: nn.Cell, cfg: LoraConfig) -> int:
    """Freeze every parameter of `model` and wrap each target Dense in a LoraDense (mutates the model).
    Returns the number of trainable parameters, exactly sum over wrapped cells of rank * (in + out).
    Raises ConfigError naming `lora.<field>` for an invalid cfg, or lora.targets when no sub-cell matches."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    for param in model.get_parameters():
        param.requires_grad = False
    wrapped = 0
    for name, cell in list(model.cells_and_names()):
        for child_name, child in list(cell.name_cells().items()):
            if child_name in cfg.targets and not isinstance(child, (LoraDense, GroupedLora)) \
                    and hasattr(child, "weight"):  # MoE experts (GroupedLinear): one adapter per expert
                wrapper = GroupedLora if isinstance(child, GroupedLinear) else LoraDense
                setattr(cell, child_name, wrapper(child, cfg.rank, cfg.alpha, cfg.dropout, rng))
                wrapped += 1
    if not wrapped:
        raise ConfigError("lora.targets", list(cfg.targets), "matched no sub-cell of the model")
    model.update_parameters_name()  # parameters take their cell paths (layers.0.attention.wq.lora_a, ...)
    return sum(p.size for p in model.trainable_params())


def merged_weights(model: nn.Cell) -> dict[str, np.ndarray]:
    """Plain parameter names -> float32 arrays with each adapter folded in: W + (alpha / r) B A (float64 math)."""
    out = {}
    for name, cell in model.cells_and_names():
        if isinstance(cell, (LoraDense, GroupedLora)):
            base = cell.base.weight.astype(mstype.float32).asnumpy().astype(np.float64)
            delta = cell.lora_b.asnumpy().astype(np.float64) @ cell.lora_a.asnumpy().astype(np.float64)  # per expert
            out[f"{name}.weight"] = (base + cell.scaling * delta).astype(np.float32)
            if getattr(cell.base, "bias", None) is not None:
                out[f"{name}.bias"] = cell.base.bias.astype(mstype.float32).asnumpy()
    for param in model.get_parameters():
        if ".lora_" in param.name or ".base." in param.name:
            continue
        out[param.name] = param.astype(mstype.float32).asnumpy()
    return out
