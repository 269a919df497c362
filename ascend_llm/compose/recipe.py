"""Finding the recipes, registering the schema with Hydra's ConfigStore, and composing a validated recipe."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ascend_llm.compose.overrides import check_group_options, quote_overrides
from ascend_llm.compose.pretrained import apply_pretrained
from ascend_llm.config.root import RecipeConfig
from ascend_llm.errors import ConfigError

SCHEMA_NAME = "recipe_schema"


def recipes_dir() -> Path:
    """The recipes folder: `<repo>/recipes` in a source or editable checkout, else the copy shipped in the wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "recipes", package / "recipes"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no recipes folder with train.yaml beside {package}")


def register_schema() -> None:
    """Store RecipeConfig in Hydra's ConfigStore as `recipe_schema` (the recipes' defaults list names it)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RecipeConfig)


def to_recipe(cfg: DictConfig, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Turn a composed DictConfig into the typed, validated RecipeConfig (model.pretrained applied: its
    directory's architecture replaces the model group's; `overrides` are checked against it)."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    recipe = OmegaConf.to_object(plain)
    if not isinstance(recipe, RecipeConfig):
        raise ConfigError("recipe", type(recipe).__name__, "must compose to the RecipeConfig schema")
    return apply_pretrained(recipe.validate(), overrides)


# Hydra's words for a value that needed quotes (a space or newline: the lexer; a comma: a sweep in a plain run)
_UNQUOTED = ("Lexer", "Ambiguous value", "mismatched input", "extraneous input", "no viable alternative")


def compose_recipe(overrides: Sequence[str] = (), config_name: str = "train") -> RecipeConfig:
    """Compose `recipes/<config_name>.yaml` with command-line style overrides; raise ConfigError on bad input."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    overrides = quote_overrides(overrides)
    check_group_options(overrides, recipes_dir())
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if exc.__cause__ is not None:
            reason += ": " + str(exc.__cause__).splitlines()[0]
        if any(word in reason for word in _UNQUOTED) or type(exc).__name__ == "OverrideParseException":
            reason += " (quote a value that holds spaces, commas, quotes or newlines: key='a, b')"
        raise ConfigError("overrides", " ".join(overrides), reason) from None
    try:
        return to_recipe(cfg, overrides)
    except OmegaConfBaseException as exc:
        raise ConfigError("recipe", " ".join(overrides), " ".join(str(exc).split())) from None
