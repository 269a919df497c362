"""`model.pretrained=DIR`: the architecture and tokenizer of a run come from a Hugging Face model directory.

`apply_pretrained(recipe, overrides)` replaces the model group's numbers with the directory's config.json
(interop/hf_config.py), points data.tokenizer at DIR/tokenizer.json and data.eos_token at the model's EOS
(generation_config.json's first eos_token_id, else tokenizer_config.json's eos_token). A command-line
override of an architecture field (or of data.tokenizer / data.eos_token) that disagrees with the directory is
a ConfigError naming it. The weights are read later, on every rank, by `load_pretrained_weights`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import ConfigError, UserInputError

NOT_ARCHITECTURE = ("name", "pretrained", "init_std")


def _explicit(overrides: Sequence[str]) -> dict[str, str]:
    """{dotted key: value text} of `key=value` overrides (Hydra's +/++/~ prefixes dropped)."""
    out = {}
    for item in overrides:
        if "=" in item:
            key, value = item.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-12 * max(abs(float(a)), abs(float(b)), 1.0)
    return a == b


def pretrained_eos(root: Path) -> str:
    """The EOS token text of a model directory: generation_config.json's (first) eos_token_id, else
    tokenizer_config.json's eos_token. ConfigError when neither names a token of tokenizer.json."""
    from ascend_llm.interop.hf import read_generation_config
    from ascend_llm.interop.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(root)
    ids = read_generation_config(root)["eos_token_ids"]
    text = tokenizer.tokenizer.id_to_token(ids[0]) if ids else tokenizer.eos_token
    if not text or tokenizer.tokenizer.token_to_id(text) is None:
        raise ConfigError("model.pretrained", str(root), "needs an EOS token (generation_config.json eos_token_id "
                          "or tokenizer_config.json eos_token) present in tokenizer.json")
    return text


def apply_pretrained(recipe, overrides: Sequence[str] = ()):
    """The recipe with model/data.tokenizer/data.eos_token taken from model.pretrained (unchanged without it).

    Raises ConfigError (directory unreadable, unsupported architecture, conflicting override)."""
    if not recipe.model.pretrained:
        return recipe
    from ascend_llm.interop.hf import read_config
    from ascend_llm.interop.hf_config import model_config_from_hf

    root = Path(recipe.model.pretrained).expanduser()
    if not (root / "config.json").is_file():
        raise ConfigError("model.pretrained", recipe.model.pretrained,
                          "must be a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    try:
        hf = model_config_from_hf(read_config(root), name=root.name)
        eos = pretrained_eos(root)
    except UserInputError as exc:
        raise ConfigError("model.pretrained", str(root), exc.one_line()) from None
    explicit = _explicit(overrides)
    for f in fields(ModelConfig):
        key = f"model.{f.name}"
        if f.name in NOT_ARCHITECTURE or key not in explicit:
            continue
        if not _same(getattr(recipe.model, f.name), getattr(hf, f.name)):
            raise ConfigError(key, explicit[key], f"conflicts with model.pretrained ({root}/config.json gives "
                              f"{getattr(hf, f.name)!r}); drop the override")
    wanted = {"data.tokenizer": str(root / "tokenizer.json"), "data.eos_token": eos}
    for key, value in wanted.items():
        given = getattr(recipe.data, key.split(".")[1])
        if key in explicit and given is not None and str(Path(given).expanduser()) != value and given != value:
            raise ConfigError(key, given, f"conflicts with model.pretrained (which uses {value!r}); drop the override")
    hf.name, hf.pretrained, hf.init_std = f"pretrained:{root.name}", str(root), recipe.model.init_std
    recipe.model = hf
    recipe.data.tokenizer, recipe.data.eos_token = wanted["data.tokenizer"], eos
    return recipe.validate()


def describe_source(root: Path) -> dict:
    """What a pretrained directory is, for logs: path and config.json's architectures."""
    raw = json.loads((Path(root) / "config.json").read_text())
    return {"pretrained": str(root), "architectures": raw.get("architectures")}
