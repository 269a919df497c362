"""Load a model from any source the CLI accepts: a training run or checkpoint directory, a quantized model
directory (quant/io.py layout) or a Hugging Face directory (through ascend_llm.interop.hf when installed)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import CheckpointError


@dataclass
class ModelSource:
    model: object
    model_cfg: ModelConfig
    kind: str  # "checkpoint", "quantized" or "hf"
    weight_files: list  # the files holding the weights (their size = bytes on disk)
    tokenizer_file: Optional[Path]
    quantization: Optional[dict] = None
    tokenizer: object = None  # a loaded tokenizer (HF sources), else read from tokenizer_file

    def bytes_on_disk(self) -> int:
        return sum(Path(f).stat().st_size for f in self.weight_files)


def _model_config(saved: dict, where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError as exc:
        raise CheckpointError(where, "model config", f"unreadable ({exc})") from None


def _from_checkpoint(step_dir: Path) -> ModelSource:
    from mindspore import Tensor

    from ascend_llm.models.llama import build_model
    from ascend_llm.train.checkpoint import checkpoint_config, read_checkpoint

    meta, tensors = read_checkpoint(step_dir)
    arrays = tensors.get("model", {})
    cfg = _model_config(checkpoint_config(meta).get("model", {}), str(step_dir / "state.json"))
    model = build_model(cfg)
    for name, param in model.parameters_and_names():
        if name not in arrays:
            raise CheckpointError(f"{step_dir}/model.safetensors[{name}]", "missing", "the model needs it")
        param.set_data(Tensor(arrays[name]))
    tokenizer = step_dir / "tokenizer.json"  # every checkpoint keeps a copy of its run's tokenizer
    return ModelSource(model, cfg, "checkpoint", [step_dir / "model.safetensors"],
                       tokenizer if tokenizer.is_file() else None)


def _from_hf(directory: Path) -> ModelSource:
    try:
        from ascend_llm.interop import hf
    except ImportError:
        raise CheckpointError(str(directory), "Hugging Face directory",
                              "reading it needs ascend_llm.interop.hf (the Hugging Face import)") from None
    model, model_cfg, tokenizer = hf.load(str(directory))
    files = sorted(directory.glob("*.safetensors"))
    tok = directory / "tokenizer.json"
    return ModelSource(model, model_cfg, "hf", files, tok if tok.is_file() else None, tokenizer=tokenizer)


def load_source(path: str) -> ModelSource:
    """Dispatch on what the directory holds; CheckpointError (one line) when it is none of the known kinds."""
    from ascend_llm.interop.quantized import load_quantized
    from ascend_llm.train.checkpoint import latest_valid_checkpoint

    directory = Path(path).expanduser()
    config = directory / "config.json"
    if config.is_file():
        try:
            saved = json.loads(config.read_text())
        except ValueError as exc:
            raise CheckpointError(str(config), "unreadable", f"must be JSON ({exc})") from None
        if "quantization" in saved and "model" in saved:
            model, cfg, section = load_quantized(directory)
            tok = directory / "tokenizer.json"
            return ModelSource(model, cfg, "quantized", [directory / "model.safetensors"],
                               tok if tok.is_file() else None, section)
        return _from_hf(directory)
    if (directory / "state.json").is_file():
        return _from_checkpoint(directory)
    if (directory / "checkpoints").is_dir():
        found = latest_valid_checkpoint(directory)
        if found is not None:
            return _from_checkpoint(found[0])
    raise CheckpointError("model", str(path), "must be a run directory, a checkpoint step directory, a quantized "
                          "model directory (ascend-llm quantize) or a Hugging Face model directory")
