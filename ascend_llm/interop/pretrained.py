"""What `model.pretrained=DIR` reads before a run is built (no MindSpore import): the architecture from
config.json and the EOS token text (generation_config.json's first eos_token_id, else tokenizer_config.json's
eos_token), and later, on every rank, the weights (`load_pretrained_weights`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError
from ascend_llm.interop.hf_config import model_config_from_hf
from ascend_llm.interop.tokenizer import HFTokenizer


def _json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InteropError(str(file), "unreadable", f"must be valid JSON ({exc})") from None


def pretrained_architecture(root: Path) -> tuple[ModelConfig, str]:
    """(ModelConfig of DIR/config.json, EOS token text). InteropError names the missing or unsupported key."""
    root = Path(root)
    if not (root / "config.json").is_file():
        raise InteropError(str(root / "config.json"), "missing", "a Hugging Face model directory holds config.json")
    raw = _json(root / "config.json")
    cfg = model_config_from_hf(raw, name=root.name)
    tokenizer = HFTokenizer(root)
    gen_file = root / "generation_config.json"
    eos = (_json(gen_file) if gen_file.is_file() else {}).get("eos_token_id", raw.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) and eos else eos
    text = tokenizer.tokenizer.id_to_token(int(eos)) if isinstance(eos, int) else tokenizer.eos_token
    if not text or tokenizer.tokenizer.token_to_id(text) is None:
        raise InteropError(str(root), "no EOS", "needs generation_config.json eos_token_id or tokenizer_config.json "
                           "eos_token naming a token of tokenizer.json")
    return cfg, text


def load_pretrained_weights(model, cfg: ModelConfig) -> None:
    """Copy DIR's weights (cfg.pretrained) into a freshly built model; every parameter given, exact shapes."""
    from ascend_llm.interop.hf import assign_weights, read_hf_weights

    assign_weights(model, read_hf_weights(Path(cfg.pretrained), cfg), source=str(cfg.pretrained))


def merge_lora_tensors(run_config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Full float32 model weights of a checkpoint of a `model.pretrained` run (for export).

    run_config: the run's resolved recipe as a dict (model.pretrained, lora.rank, lora.alpha). tensors: the
    checkpoint's model part, by parameter name: with LoRA only `<cell>.lora_a` (r, in) and `<cell>.lora_b`
    (out, r); without LoRA every parameter. The base comes from DIR's safetensors; each adapted weight becomes
    W + (alpha / r) B A computed in float64 (Hu et al. 2021, eq. 3), every other checkpoint tensor replaces the
    base's. InteropError names an adapter without its pair or a weight the base lacks."""
    from ascend_llm.interop.hf import read_hf_weights

    model = ModelConfig(**{k: v for k, v in run_config["model"].items() if k in ModelConfig.__dataclass_fields__})
    weights = read_hf_weights(Path(model.pretrained), model)
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
