"""`ascend-llm bench <name> [args]`: runs `ascend_llm.bench.<name>.main(args)`."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import ascend_llm.bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(ascend_llm.bench.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ascend-llm bench {" + ",".join(names) + "} [args]")
        return 0
    if argv[0] not in names:
        print(f"ascend-llm bench: name={argv[0]!r}: allowed: {', '.join(names)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"ascend_llm.bench.{argv[0]}").main(argv[1:]) or 0)
