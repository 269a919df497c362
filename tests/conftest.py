"""Shared test setup: CPU graph mode, and paths to the shared corpora beside the project."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"


@pytest.fixture(scope="session", autouse=True)
def cpu_graph_mode():
    import mindspore as ms

    from ascend_llm.train.runtime import set_cpu_threads

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    set_cpu_threads(os.cpu_count() or 1)
    yield


@pytest.fixture
def tang_poems() -> Path:
    path = CORPORA / "tang_poems.jsonl"
    if not path.is_file():
        pytest.skip(f"shared corpus absent: {path}")
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenized-corpus cache for the whole session (tokenizer training runs once)."""
    return str(tmp_path_factory.mktemp("data_cache"))
