"""House rule 1: model code imports nothing from precision/ or parallel/, nor mindspore.communication."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ascend_llm

PACKAGE = Path(ascend_llm.__file__).parent
FORBIDDEN = ("ascend_llm.precision", "ascend_llm.parallel", "mindspore.communication")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_model_sources_do_not_import_precision_or_parallel():
    files = sorted((PACKAGE / "models").glob("*.py"))
    assert files
    for file in files:
        bad = [m for m in imported_modules(file) if m.startswith(FORBIDDEN)]
        assert not bad, f"{file.name} imports {bad}"
        assert "set_auto_parallel_context" not in file.read_text()


def test_importing_models_loads_no_precision_or_parallel_module():
    # (mindspore imports its own communication package on import, so that part is checked on the sources above)
    code = ("import sys, ascend_llm.models; "
            "print([m for m in sys.modules if m.startswith(('ascend_llm.precision', 'ascend_llm.parallel'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
