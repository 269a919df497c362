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


def checked_files(folder: str, forbidden: tuple, allowed: tuple = ()) -> list[Path]:
    """The folder's sources (at least one), asserting none imports a module under `forbidden` (except under
    `allowed`); returns them for further checks."""
    files = sorted((PACKAGE / folder).glob("*.py"))
    assert files
    for file in files:
        bad = [m for m in imported_modules(file) if m.startswith(forbidden) and not (allowed and m.startswith(allowed))]
        assert not bad, f"{folder}/{file.name} imports {bad}"
    return files


def test_model_sources_do_not_import_precision_or_parallel():
    for file in checked_files("models", FORBIDDEN):
        assert "set_auto_parallel_context" not in file.read_text()


def test_importing_models_loads_no_precision_or_parallel_module():
    # (mindspore imports its own communication package on import, so that part is checked on the sources above)
    code = ("import sys, ascend_llm.models; "
            "print([m for m in sys.modules if m.startswith(('ascend_llm.precision', 'ascend_llm.parallel'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


CONFIG_FORBIDDEN = ("ascend_llm.parallel", "ascend_llm.cluster", "ascend_llm.train", "ascend_llm.data",
                    "ascend_llm.precision", "ascend_llm.models", "ascend_llm.interop", "ascend_llm.compose",
                    "ascend_llm.store", "mindspore", "hydra", "omegaconf")
FILE_OPENERS = ("open(", ".read_text(", ".read_bytes(", "json.load(", "yaml.safe_load(")


def test_config_is_the_ground_floor():
    """config/ imports nothing above it (no Hydra: composition lives in compose/) and opens no files (file checks
    live in cluster/preflight.py)."""
    for file in checked_files("config", CONFIG_FORBIDDEN):
        text = file.read_text()
        assert not [call for call in FILE_OPENERS if call in text], f"config/{file.name} opens files"


def test_cluster_code_is_outside_the_step():
    """cluster/ (launcher, rank tables, supervisor) never imports the in-step parallel code or MindSpore."""
    # the planner (parallel/plan*) is pure arithmetic, used by the preflight
    checked_files("cluster", ("ascend_llm.parallel", "mindspore", "ascend_llm.train"), ("ascend_llm.parallel.plan",))


def module_graph() -> dict[str, set[str]]:
    """{module: ascend_llm modules it imports (anywhere in the file, lazy imports included)}."""
    graph = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in imported_modules(file) if m.startswith("ascend_llm.")}
    known = set(graph)
    return {name: {m if m in known else m.rsplit(".", 1)[0] for m in deps} & known - {name}
            for name, deps in graph.items()}


def test_no_import_cycles_inside_a_folder():
    """Cycles through a package __init__ re-export are allowed; module-to-module cycles within a folder are not
    (the precision cycle through fp8.py's lazy re-export was one)."""
    graph = module_graph()

    def visit(node, path):
        for dep in graph.get(node, ()):
            if dep.endswith("__init__") or dep.count(".") < 2 or dep.rsplit(".", 1)[0] != node.rsplit(".", 1)[0]:
                continue
            assert dep not in path, f"import cycle: {' -> '.join(path + [dep])}"
            visit(dep, path + [dep])

    for module in graph:
        if module.count(".") >= 2:
            visit(module, [module])


def folder_graph() -> dict[str, set[str]]:
    """{top-level folder or module of ascend_llm: the others it imports, lazy imports included}."""
    graph: dict[str, set[str]] = {}
    for name, deps in module_graph().items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        graph.setdefault(parts[1], set()).update(d.split(".")[1] for d in deps if d.count(".") >= 1)
    return {folder: deps - {folder} for folder, deps in graph.items()}


def test_no_folder_imports_back_up():
    """Every pair of folders: imports point one way only. The folders form floors (a topological order of this
    graph); an arrow back up would close a cycle, and the assertion names one."""
    graph = folder_graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            assert dep not in path, f"folders import each other: {' -> '.join(path + [dep])}"
            if dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for folder in sorted(graph):
        visit(folder, [folder])


def test_importing_a_schema_loads_no_hydra():
    code = ("import sys, ascend_llm.config.model; "
            "print(sorted(m for m in sys.modules if m.startswith(('hydra', 'omegaconf'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
