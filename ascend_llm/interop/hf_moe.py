"""Mixture-of-Experts expert tensors between the toolkit's stacked weights and the two Hugging Face layouts.

Toolkit: `layers.L.feed_forward.experts.{w1,w3}.weight` (E, I, H) and `experts.w2.weight` (E, H, I) (w1 = gate_proj,
w3 = up_proj, w2 = down_proj). Hugging Face, either
- per expert (Hub checkpoints, transformers' default `save_pretrained`):
  `model.layers.L.mlp.experts.{e}.{gate,up,down}_proj.weight`, (I, H), (I, H), (H, I);
- fused (transformers 5 in memory, `save_original_format=False`): `model.layers.L.mlp.experts.gate_up_proj`
  (E, 2I, H) = [gate_proj; up_proj] stacked along dim 1 (gate rows first) and `mlp.experts.down_proj` (E, H, I).
Every expert of every sparse layer must be present exactly once with its shape, in one layout per layer: a
missing, duplicated, out-of-range or misshapen expert is an InteropError naming the tensor (a converter that
silently dropped expert weights is the failure this guards against, Megatron-LM#5844).
"""

from __future__ import annotations

import re

import numpy as np

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError

LAYOUTS = ("per_expert", "fused")
_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_OURS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def is_expert_tensor(hf_name: str) -> bool:
    """Whether a Hugging Face tensor name is an expert weight of either layout."""
    return bool(_PER_EXPERT.match(hf_name) or _FUSED.match(hf_name))


def _where(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts"


def stack_experts(tensors: dict[str, np.ndarray], cfg: ModelConfig, where: str = "weights") -> dict[str, np.ndarray]:
    """Toolkit-named stacked expert weights (float32) from HF expert tensors of either layout (`is_expert_tensor`
    names). InteropError (naming `where` and the tensor) for an expert tensor of a dense or absent layer, a layer
    mixing layouts, an expert index >= num_experts, a wrong shape, or a sparse layer missing any expert."""
    num, dim, hidden = cfg.num_experts, cfg.dim, cfg.moe_ffn_hidden_dim
    per_layer: dict[int, dict] = {}
    for name, array in tensors.items():
        match = _PER_EXPERT.match(name) or _FUSED.match(name)
        layer = int(match.group(1))
        if not (layer < cfg.num_layers and cfg.is_sparse_layer(layer)):
            raise InteropError(f"{where}:{name}", list(array.shape), "expert weights of a layer the config makes dense")
        per_layer.setdefault(layer, {})[name] = np.asarray(array, np.float32)
    out = {}
    for layer in range(cfg.num_layers):
        if not cfg.is_sparse_layer(layer):
            continue
        found = per_layer.get(layer, {})
        fused = {n for n in found if _FUSED.match(n)}
        if fused and len(fused) != len(found):
            raise InteropError(f"{where}:{_where(layer)}", sorted(found)[:3], "mixes the per-expert and fused layouts")
        stacked = _from_fused(found, layer, num, dim, hidden, where) if fused \
            else _from_per_expert(found, layer, num, dim, hidden, where)
        for ours, value in stacked.items():
            out[f"layers.{layer}.feed_forward.experts.{ours}.weight"] = value
    return out


def _check_shape(name: str, array: np.ndarray, shape: tuple, where: str) -> None:
    if tuple(array.shape) != shape:
        raise InteropError(f"{where}:{name}", list(array.shape), f"shape must be {list(shape)}")


def _from_fused(found: dict, layer: int, num: int, dim: int, hidden: int, where: str) -> dict[str, np.ndarray]:
    gate_up, down = f"{_where(layer)}.gate_up_proj", f"{_where(layer)}.down_proj"
    for name in (gate_up, down):
        if name not in found:
            raise InteropError(f"{where}:{name}", "missing", f"the fused layout of layer {layer} needs it")
    _check_shape(gate_up, found[gate_up], (num, 2 * hidden, dim), where)
    _check_shape(down, found[down], (num, dim, hidden), where)
    return {"w1": found[gate_up][:, :hidden], "w3": found[gate_up][:, hidden:], "w2": found[down]}


def _from_per_expert(found: dict, layer: int, num: int, dim: int, hidden: int, where: str) -> dict[str, np.ndarray]:
    shapes = {"w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden)}
    stacked = {ours: np.zeros((num,) + shape, np.float32) for ours, shape in shapes.items()}
    seen = set()
    for name, array in found.items():
        match = _PER_EXPERT.match(name)
        expert, ours = int(match.group(2)), _OURS[match.group(3)]
        if expert >= num:
            raise InteropError(f"{where}:{name}", expert, f"expert index must be below num_experts={num}")
        _check_shape(name, array, shapes[ours], where)
        stacked[ours][expert] = array
        seen.add((expert, ours))
    for expert in range(num):
        for theirs, ours in _OURS.items():
            if (expert, ours) not in seen:
                raise InteropError(f"{where}:{_where(layer)}.{expert}.{theirs}.weight", "missing",
                                   f"every one of the {num} experts of sparse layer {layer} is needed")
    return stacked


def unstack_experts(cfg: ModelConfig, weights: dict[str, np.ndarray], layout: str = "per_expert") -> dict:
    """HF-named expert tensors (in layer, expert order) from the toolkit's stacked weights, in `layout`
    (per_expert or fused). InteropError for an unknown layout or a missing or misshapen stacked weight."""
    if layout not in LAYOUTS:
        raise InteropError("expert layout", layout, "allowed: " + ", ".join(LAYOUTS))
    num, dim, hidden = cfg.num_experts, cfg.dim, cfg.moe_ffn_hidden_dim
    shapes = {"w1": (num, hidden, dim), "w3": (num, hidden, dim), "w2": (num, dim, hidden)}
    out = {}
    for layer in range(cfg.num_layers):
        if not cfg.is_sparse_layer(layer):
            continue
        stacked = {}
        for ours, shape in shapes.items():
            name = f"layers.{layer}.feed_forward.experts.{ours}.weight"
            if name not in weights:
                raise InteropError(f"weights:{name}", "missing", "every model tensor is needed for export")
            stacked[ours] = np.asarray(weights[name], np.float32)
            _check_shape(name, stacked[ours], shape, "weights")
        if layout == "fused":
            out[f"{_where(layer)}.gate_up_proj"] = np.concatenate([stacked["w1"], stacked["w3"]], axis=1)
            out[f"{_where(layer)}.down_proj"] = stacked["w2"]
            continue
        for expert in range(num):
            for theirs, ours in _OURS.items():
                out[f"{_where(layer)}.{expert}.{theirs}.weight"] = stacked[ours][expert]
    return out
