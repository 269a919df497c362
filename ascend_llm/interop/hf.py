"""Import a Hugging Face model directory (Llama, Qwen2, Qwen3) into the toolkit.

`load(path) -> (model, model_config, tokenizer)`: calling `model` on int32 ids (B, T) returns float32 logits
(B, T, vocab). `load_pretrained(path) -> (ModelConfig, weights, tokenizer_dir)` is what a trainer needs to start
from pretrained weights: toolkit parameter names -> float32 arrays. Weights come from `model.safetensors` or
the shards listed in `model.safetensors.index.json`; bf16/fp16 tensors are upcast to float32 exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError
from ascend_llm.interop.hf_config import model_config_from_hf
from ascend_llm.interop.names import from_hf
from ascend_llm.interop.safetensors_io import read_tensors
from ascend_llm.tokenizer.hf import HFTokenizer

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(root: Path) -> dict:
    file = Path(root) / "config.json"
    if not file.is_file():
        raise InteropError(str(file), "missing", "a Hugging Face model directory holds config.json")
    try:
        return json.loads(file.read_text())
    except ValueError as exc:
        raise InteropError(str(file), "unreadable", f"must be valid JSON ({exc})") from None


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards named by the index, or model.safetensors."""
    root = Path(root)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise InteropError(str(index), "unreadable", f"must be JSON with a weight_map ({exc})") from None
        files = [root / name for name in names]
    else:
        files = [root / "model.safetensors"]
    for file in files:
        if not file.is_file():
            hint = " (PyTorch .bin weights are not read: convert them to safetensors)" \
                if (root / "pytorch_model.bin").exists() else ""
            raise InteropError(str(file), "missing", "listed weights must exist" + hint)
    return files


def read_hf_weights(root: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Toolkit-named float32 weights from the directory; InteropError names an unknown or missing tensor."""
    weights = {}
    for file in weight_files(root):
        for hf_name, array in read_tensors(file).items():
            name = from_hf(hf_name)
            if name is None:
                if hf_name.endswith(IGNORED_SUFFIXES):
                    continue
                raise InteropError(f"{file.name}:{hf_name}", list(array.shape),
                                   "tensor not in the Llama/Qwen2/Qwen3 layout this toolkit computes")
            if name == "output.weight" and cfg.tie_embeddings:
                continue
            weights[name] = array.astype(np.float32, copy=False)
    return weights


def read_generation_config(root: Path) -> dict:
    """generation_config.json (or {}), with `eos_token_ids` normalised to a list of ints."""
    file = Path(root) / "generation_config.json"
    gen = json.loads(file.read_text()) if file.is_file() else {}
    eos = gen.get("eos_token_id", read_config(root).get("eos_token_id"))
    gen["eos_token_ids"] = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return gen


def load_pretrained(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], Path]:
    """(ModelConfig, {toolkit parameter name: float32 array}, tokenizer directory) of a HF model directory."""
    root = Path(path)
    if not root.is_dir():
        raise InteropError("model", str(path), "must be a Hugging Face model directory (config.json, safetensors)")
    cfg = model_config_from_hf(read_config(root), name=root.name)
    return cfg, read_hf_weights(root, cfg), root


def assign_weights(model: nn.Cell, weights: dict[str, np.ndarray], source: str = "weights") -> None:
    """Copy named arrays into the model's parameters; every parameter must be given, with its exact shape."""
    params = {p.name: p for p in model.get_parameters()}
    missing = sorted(set(params) - set(weights))
    if missing:
        raise InteropError(f"{source}:{missing[0]}", "missing", f"{len(missing)} model tensor(s) absent")
    extra = sorted(set(weights) - set(params))
    if extra:
        raise InteropError(f"{source}:{extra[0]}", "unexpected", "not a parameter of the configured model")
    for name, param in params.items():
        value = weights[name]
        if tuple(value.shape) != tuple(param.shape):
            raise InteropError(f"{source}:{name}", list(value.shape), f"shape must be {list(param.shape)}")
        param.set_data(Tensor(value, param.dtype))


def load(path: str | Path):
    """(model, model_config, tokenizer) of a Hugging Face Llama/Qwen2/Qwen3 directory.

    model: `ascend_llm.models.llama.Transformer`, float32 parameters; model(int32 (B, T)) -> float32 (B, T, V).
    tokenizer: HFTokenizer (encode/decode/apply_chat_template). Raises InteropError (one line, key named).
    """
    from ascend_llm.models.llama import build_model

    cfg, weights, root = load_pretrained(path)
    model = build_model(cfg)
    assign_weights(model, weights, source=str(root))
    model.set_train(False)
    return model, cfg, HFTokenizer(root)
