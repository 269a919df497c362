"""`ascend-llm bench <name> [args]`: runs `ascend_llm.bench.<name>.main(args)`."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import ascend_llm.bench


def available() -> list[str]:
    """Benchmark modules that define `main` (helpers such as `report` are not benchmarks)."""
    names = []
    for module in pkgutil.iter_modules(ascend_llm.bench.__path__):
        source = Path(module.module_finder.path) / f"{module.name}.py"
        if not module.name.startswith("_") and source.is_file() and "\ndef main(" in source.read_text():
            names.append(module.name)
    return sorted(names)


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ascend-llm bench {" + ",".join(names) + "} [args]")
        return 0
    if argv[0] not in names:
        print(f"ascend-llm bench: name={argv[0]!r}: allowed: {', '.join(names)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"ascend_llm.bench.{argv[0]}").main(argv[1:]) or 0)
