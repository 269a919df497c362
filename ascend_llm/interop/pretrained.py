"""What `model.pretrained=DIR` reads, through the one model opener (interop/source.py): before a run is built the
architecture and the EOS token text, later, on every rank, the weights (`load_pretrained_weights`). DIR is a Hugging
Face directory, a toolkit checkpoint or a run directory (continued training from the toolkit's own model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError


def pretrained_architecture(root: Path) -> tuple[ModelConfig, str, Path]:
    """(architecture, EOS token text, the directory to read from) of what `model.pretrained` names: a Hugging Face
    directory, a toolkit checkpoint or a run directory (its newest verified checkpoint), opened by the one model
    opener. The EOS is the first of the directory's EOS ids (generation_config.json), else the tokenizer's
    eos_token. InteropError / CheckpointError name the missing or unsupported key."""
    from ascend_llm.interop.source import open_model

    source = open_model(root, weights=False)
    if source.kind == "quantized":
        raise InteropError("model.pretrained", str(root), "is a quantized directory: train from the original model")
    if source.tokenizer is None:
        raise InteropError(str(source.path / "tokenizer.json"), "missing", "a pretrained model needs its tokenizer")
    tokenizer = source.tokenizer.tokenizer
    text = tokenizer.id_to_token(source.eos_token_ids[0]) if source.eos_token_ids else source.tokenizer.eos_token
    if not text or tokenizer.token_to_id(text) is None:
        raise InteropError(str(source.path), "no EOS", "needs generation_config.json eos_token_id or "
                           "tokenizer_config.json eos_token naming a token of tokenizer.json")
    return source.config, text, source.path


def pretrained_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Full float32 weights of a `model.pretrained` directory (HF, checkpoint or run; LoRA merged)."""
    from ascend_llm.interop.source import open_model

    return open_model(path, build=False).weights


def load_pretrained_weights(model, cfg: ModelConfig) -> None:
    """Copy the weights of cfg.pretrained into a freshly built model; every parameter given, exact shapes."""
    from ascend_llm.interop.hf import assign_weights

    assign_weights(model, pretrained_weights(cfg.pretrained), source=str(cfg.pretrained))


def merge_lora_tensors(run_config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Full float32 model weights of a checkpoint of a `model.pretrained` run (for export).

    run_config: the run's resolved recipe as a dict (model.pretrained, lora.rank, lora.alpha). tensors: the
    checkpoint's model part, by parameter name: with LoRA only `<cell>.lora_a` (r, in) and `<cell>.lora_b`
    (out, r); without LoRA every parameter. The base comes from DIR's safetensors; each adapted weight becomes
    W + (alpha / r) B A computed in float64 (Hu et al. 2021, eq. 3), every other checkpoint tensor replaces the
    base's. InteropError names an adapter without its pair or a weight the base lacks."""
    weights = dict(pretrained_weights(run_config["model"]["pretrained"]))
    lora = run_config.get("lora") or {}
    scaling = float(lora.get("alpha", 0.0)) / max(int(lora.get("rank", 1)), 1)
    for name, value in tensors.items():
        if name.endswith(".lora_b"):
            continue
        if not name.endswith(".lora_a"):
            weights[name] = np.asarray(value, np.float32)
            continue
        cell = name[:-len(".lora_a")]
        if f"{cell}.lora_b" not in tensors or f"{cell}.weight" not in weights:
            raise InteropError(name, "unpaired", f"needs {cell}.lora_b and a base weight {cell}.weight")
        delta = np.asarray(tensors[f"{cell}.lora_b"], np.float64) @ np.asarray(value, np.float64)
        weights[f"{cell}.weight"] = (weights[f"{cell}.weight"].astype(np.float64) + scaling * delta).astype(np.float32)
    return weights
