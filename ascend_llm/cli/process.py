"""Process-wide settings of a CLI command. They apply only where the command owns its process (`ascend-llm ...`,
`python -m ascend_llm.cli.main ...`, msrun's workers): a test or notebook calling `main([...])` or a command's
functions in its own process keeps its garbage collector as it is."""

from __future__ import annotations

import gc

_process = {"owned": False, "frozen": False}


def own_process() -> None:
    """Mark this process as a CLI command's own (cli/main.py: `main()` run as the program, argv from sys.argv)."""
    _process["owned"] = True


def freeze_imported_objects() -> None:
    """Move every object alive now (the imported modules: MindSpore's Python side, Hydra, the toolkit) into the
    garbage collector's permanent generation (`gc.freeze`, Python >= 3.7), so the full collections that graph
    compilation triggers no longer traverse them. For a process's owner, once, after the heavy imports and before
    the work: objects created later are collected as usual; a module-level object is never garbage.
    A `debug=smoke` training run spent 6.7% of its CPU samples in `gc_collect_main` (perf, 2026-12-06)."""
    gc.collect()
    gc.freeze()


def freeze_once() -> None:
    """freeze_imported_objects() the first time it is called in a process a CLI command owns (own_process); nothing
    in a process the command does not own, or after the first call (a command that opens MindSpore twice, like
    `continual`, freezes at its first start only)."""
    if _process["owned"] and not _process["frozen"]:
        _process["frozen"] = True
        freeze_imported_objects()


def start_mindspore(graph: bool = True) -> None:
    """This command's MindSpore mode: graph (compiled, `ms.GRAPH_MODE`) or eager (`ms.PYNATIVE_MODE`); then
    freeze_once(), MindSpore being imported by now."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
    freeze_once()
