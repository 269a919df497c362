"""Open whatever the user points a verb at: a Hugging Face model directory, a toolkit checkpoint directory
(`.../checkpoints/step_N` with model.safetensors + state.json) or a toolkit run directory (its newest step)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError
from ascend_llm.interop.export import read_toolkit_checkpoint
from ascend_llm.interop.hf import load_pretrained, read_generation_config
from ascend_llm.interop.tokenizer import HFTokenizer


@dataclass
class ModelSource:
    """kind: "hf" or "checkpoint"; tokenizer: HFTokenizer or None; generation: generation_config dict with
    `eos_token_ids` (a list, possibly empty)."""

    kind: str
    path: Path
    config: ModelConfig
    weights: dict[str, np.ndarray]
    tokenizer: HFTokenizer | None
    generation: dict


def newest_step(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    steps = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return max(steps, key=lambda p: int(p.name[5:])) if steps else None


def open_source(path: str | Path) -> ModelSource:
    """Read config, weights and tokenizer from an HF directory or a toolkit checkpoint/run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        cfg, weights, root = load_pretrained(path)
        return ModelSource("hf", path, cfg, weights, HFTokenizer(root), read_generation_config(root))
    step = path if (path / "state.json").is_file() else newest_step(path)
    if step is None:
        raise InteropError("model", str(path), "must be a Hugging Face directory (config.json), a toolkit "
                                               "checkpoint (state.json) or a run directory with checkpoints/")
    cfg, weights, tokenizer_file = read_toolkit_checkpoint(step)
    if cfg.pretrained:  # a fine-tune of a Hugging Face model keeps that model's tokenizer, template and EOS
        root = Path(cfg.pretrained)
        return ModelSource("checkpoint", step, cfg, weights, HFTokenizer(root), read_generation_config(root))
    tokenizer, eos = None, []
    if tokenizer_file is not None:
        from ascend_llm.data.tokenizer import EOS

        tokenizer = HFTokenizer.from_toolkit(tokenizer_file.parent, EOS)
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(tokenizer_file)).token_to_id(EOS)
        eos = [int(eos_id)] if eos_id is not None else []
    return ModelSource("checkpoint", step, cfg, weights, tokenizer, {"eos_token_ids": eos})


def build_source_model(source: ModelSource):
    """A float32 `Transformer` holding the source's weights, in inference mode."""
    from ascend_llm.interop.hf import assign_weights
    from ascend_llm.models.llama import build_model

    model = build_model(source.config)
    known = {p.name for p in model.get_parameters()}
    assign_weights(model, {k: v for k, v in source.weights.items() if k in known}, source=str(source.path))
    model.set_train(False)
    return model
