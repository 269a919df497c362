"""`model.pretrained=DIR`: the architecture and tokenizer of a run come from a model directory: a Hugging Face
directory, a toolkit checkpoint or a run directory (its newest verified checkpoint), opened by interop/source.py's
`open_model`; a quantized directory is refused.

`apply_pretrained(recipe, overrides)` replaces the model group's numbers with the directory's architecture
(config.json, or a checkpoint's recorded model group; read by interop/pretrained.py: config/ itself opens no
files), points data.tokenizer at the opened directory's tokenizer.json (a run's: its checkpoint's) and
data.eos_token at the model's EOS (generation_config.json's first eos_token_id, else
tokenizer_config.json's eos_token). A command-line override of an architecture field (or of data.tokenizer /
data.eos_token) that disagrees with the directory is a ConfigError naming it; the model group's own numbers
are simply replaced. The weights are read later, on every rank, by interop/pretrained.py's
`load_pretrained_weights` (train/session.py, before the converters).
"""

from __future__ import annotations

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


def apply_pretrained(recipe, overrides: Sequence[str] = ()):
    """The recipe with model/data.tokenizer/data.eos_token taken from model.pretrained (unchanged without it).

    Raises ConfigError (directory unreadable, unsupported architecture, conflicting override)."""
    if not recipe.model.pretrained:
        return recipe
    from ascend_llm.interop.pretrained import pretrained_architecture

    root = Path(recipe.model.pretrained).expanduser().resolve()
    try:
        hf, eos, root = pretrained_architecture(root)
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
        if key not in explicit or given is None or given == value:
            continue
        if key == "data.tokenizer" and str(Path(given).expanduser().resolve()) == value:
            continue
        raise ConfigError(key, given, f"conflicts with model.pretrained (which uses {value!r}); drop the override")
    hf.name, hf.pretrained, hf.init_std = f"pretrained:{root.name}", str(root), recipe.model.init_std
    recipe.model = hf
    recipe.data.tokenizer, recipe.data.eos_token = wanted["data.tokenizer"], eos
    return recipe.validate()

