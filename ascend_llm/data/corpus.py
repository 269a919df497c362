"""Reading a corpus: .txt files, a folder of them, .jsonl (one JSON object per line), or the embedded default.

The embedded default is this interpreter's own standard-library sources, so training works on any fresh machine.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from ascend_llm.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a stable order, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "dist-packages"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def corpus_files(path: Optional[str], fmt: str) -> tuple[list[Path], str]:
    """Resolve data.path to (files, format). Raises DataError for a missing path or no usable files."""
    if path is None:
        return stdlib_files(), "txt"
    source = Path(path).expanduser()
    if not source.exists():
        raise DataError("data.path", path, "does not exist; give a .txt/.jsonl file or a folder of them")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
    else:
        files = [source]
    if not files:
        raise DataError("data.path", path, f"folder holds no {', '.join(TEXT_SUFFIXES + ('.jsonl',))} files")
    if fmt == "auto":
        fmt = "jsonl" if all(p.suffix == ".jsonl" for p in files) else "txt"
    return files, fmt


def _jsonl_texts(file: Path, text_field: str) -> Iterator[str]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{number}", line[:40].strip(), f"not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{file}:{number}.{text_field}", "missing",
                                f"each line must be an object with a '{text_field}' field (data.text_field)")
            yield str(record[text_field])


def read_documents(path: Optional[str], fmt: str = "auto", text_field: str = "text",
                   max_bytes: int = 4_000_000) -> list[str]:
    """Documents (non-empty strings) in a deterministic order, stopping once max_bytes of UTF-8 are read."""
    files, fmt = corpus_files(path, fmt)
    docs: list[str] = []
    total = 0
    for file in files:
        if fmt == "jsonl":
            texts = _jsonl_texts(file, text_field)
        else:
            try:
                texts = iter([file.read_text(encoding="utf-8")])
            except UnicodeDecodeError:
                continue
        for text in texts:
            if not text.strip():
                continue
            docs.append(text)
            total += len(text.encode("utf-8"))
            if total >= max_bytes:
                return docs
    if not docs:
        raise DataError("data.path", path if path is not None else "<stdlib>", "corpus holds no non-empty text")
    return docs
