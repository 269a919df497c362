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
    return source.config, text, source.path.resolve()


def pretrained_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Full float32 weights of a `model.pretrained` directory (HF, checkpoint or run; LoRA merged)."""
    from ascend_llm.interop.source import open_model

    return open_model(path, build=False).weights


def load_pretrained_weights(model, cfg: ModelConfig) -> None:
    """Copy the weights of cfg.pretrained into a freshly built model; every parameter given, exact shapes."""
    from ascend_llm.interop.hf_files import assign_weights

    assign_weights(model, pretrained_weights(cfg.pretrained), source=str(cfg.pretrained))
