"""What `model.pretrained=DIR` reads before a run is built (no MindSpore import): the architecture from
config.json and the EOS token text (generation_config.json's first eos_token_id, else tokenizer_config.json's
eos_token), and later, on every rank, the weights (`load_pretrained_weights`)."""

from __future__ import annotations

import json
from pathlib import Path

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
