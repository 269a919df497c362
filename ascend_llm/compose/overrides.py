"""Command-line overrides as users type them: non-ASCII values, unknown group options, sweep expansion.

Hydra's override lexer accepts only ASCII in unquoted values (`train.sample_prompt=经济` fails with a bare
`LexerNoViableAltException`); `quote_overrides` quotes such values the way a user would. `check_group_options`
names the valid options of a recipe group when one is misspelt. `expand_sweep` lists every combination of a
`--multirun` sweep, so all of them can be composed and validated before any job runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from ascend_llm.errors import ConfigError

SYNTAX = set("[]{}()$")  # override grammar (lists, dicts, functions, interpolation): left as typed


def _quote(value: str) -> str:
    body = value.replace("'", "\\'")
    stripped = body.rstrip("\\")
    return "'" + stripped + "\\" * 2 * (len(body) - len(stripped)) + "'"


def quote_overrides(overrides: Sequence[str], sweep: bool = False) -> list[str]:
    """Quote `key=value` values holding non-ASCII text (unless they already use override syntax). In a sweep,
    each comma-separated value is quoted on its own."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or value.isascii() or SYNTAX & set(value) or value[:1] in ("'", '"'):
            out.append(item)
            continue
        parts = value.split(",") if sweep else [value]
        out.append(f"{key}=" + ",".join(_quote(part) for part in parts))
    return out


def check_group_options(overrides: Sequence[str], recipes: Path) -> None:
    """ConfigError naming the group, the option and the allowed options when `group=option` names no
    `recipes/<group>/<option>.yaml` (each value of a sweep is checked)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        group = key.lstrip("+~")
        folder = recipes / group
        if not sep or "." in group or not folder.is_dir() or SYNTAX & set(value):
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        for option in value.split(","):
            if option and option != "null" and option not in options:
                raise ConfigError(group, option, f"allowed: {', '.join(options)}")


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of a Hydra sweep (`a=1,2 b=x,y` -> 4 override lists), in Hydra's order. Raises
    ConfigError for an override Hydra cannot parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError("overrides", " ".join(overrides), str(exc).splitlines()[0]) from None
    axes = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            key = text.partition("=")[0]
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(combo) for combo in itertools.product(*axes)]
