"""A corpus: one file, a folder of files (any mix of kinds), or the embedded default, streamed as documents.

The embedded default is this interpreter's own standard-library sources, so training works on any fresh machine.
A relative data.path is looked up in the working directory first, then beside the repository and its parents
(so `../shared/corpora/...` in a recipe works from any working directory, as the rank-table paths do).
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ascend_llm.data.readers import KINDS, FileStats, file_kind, read_pieces
from ascend_llm.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_MAX_BYTES = 4_000_000  # the embedded corpus is the first 4 MB of the stdlib (data.max_bytes overrides)


def stdlib_files() -> list[Path]:
    """The standard library's .py files in a stable order, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "dist-packages"}
    found = []  # (relative posix path, path); skipped folders are not walked (their files were most of the time)
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        rel = Path(folder).relative_to(root)
        found += [((rel / n).as_posix(), Path(folder) / n) for n in names if n.endswith(".py")]
    return [path for _, path in sorted(found)]


def resolve_path(path: str, field_name: str = "data.path") -> Path:
    """data.path as an existing absolute path: as given, else relative to the repository or one of its parents."""
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given] + [
        base / given for base in (REPO_ROOT, *list(REPO_ROOT.parents)[:2])]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise DataError(field_name, path, "does not exist (looked in " + ", ".join(map(str, candidates)) +
                    "); give a corpus file or a folder of .txt/.md/.jsonl/.json(.gz) files")


@dataclass
class CorpusFiles:
    """The files of one corpus with their reader kind, and the files a folder held that no reader takes."""

    files: list[tuple[Path, str]]
    ignored: list[str] = field(default_factory=list)
    source: str = "<python stdlib>"
    default_max_bytes: Optional[int] = None  # the cap when data.max_bytes is None

    def max_bytes(self, requested: Optional[int]) -> Optional[int]:
        """The byte cap to read: `requested` (data.max_bytes) when given, else this corpus's default (None: all)."""
        return requested if requested is not None else self.default_max_bytes


def corpus_files(path: Optional[str], fmt: str = "auto", field_name: str = "data.path") -> CorpusFiles:
    """Resolve a corpus path to its files (sorted by path) and kinds. Raises DataError naming field_name."""
    if path is None:
        return CorpusFiles([(p, "text") for p in stdlib_files()], default_max_bytes=EMBEDDED_MAX_BYTES)
    source = resolve_path(path, field_name)
    if source.is_file():
        kind = file_kind(source, fmt)
        if kind is None:
            raise DataError(field_name, path, "unknown file kind; use a suffix among " + ", ".join(KINDS) +
                            " (optionally .gz) or set data.format=txt|jsonl|json")
        return CorpusFiles([(source, kind)], source=str(source))
    files, ignored = [], []
    for p in sorted(q for q in source.rglob("*") if q.is_file()):
        kind = file_kind(p, fmt) if fmt == "auto" or file_kind(p) is not None else None
        if kind is None or any(part.startswith(".") for part in p.relative_to(source).parts):
            ignored.append(str(p.relative_to(source)))
        else:
            files.append((p, kind))
    if not files:
        raise DataError(field_name, path, "folder holds no " + ", ".join(KINDS) + " (or .gz) files")
    return CorpusFiles(files, ignored, str(source))


def iter_documents(corpus: CorpusFiles, on_bad_record: str = "error", text_field: str = "text",
                   max_bytes: Optional[int] = None, stats: Optional[list] = None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the corpus in file order. Stops after the document during which
    max_bytes (UTF-8; None: the corpus's default, no cap for user corpora) is reached. Appends one FileStats
    per file opened to `stats`."""
    total, max_bytes = 0, corpus.max_bytes(max_bytes)
    for path, kind in corpus.files:
        file_stats = FileStats(str(path), kind)
        if stats is not None:
            stats.append(file_stats)
        for text, ends in read_pieces(path, kind, on_bad_record, text_field, file_stats):
            total += len(text.encode("utf-8"))
            yield text, ends
            if ends and max_bytes is not None and total >= max_bytes:
                return


def read_documents(path: Optional[str], fmt: str = "auto", text_field: str = "text",
                   max_bytes: Optional[int] = None, on_bad_record: str = "error") -> list[str]:
    """Whole documents as a list (small corpora and tests; `prepare` streams instead). Raises DataError."""
    docs, parts = [], []
    for text, ends in iter_documents(corpus_files(path, fmt), on_bad_record, text_field, max_bytes):
        parts.append(text)
        if ends:
            docs.append("".join(parts))
            parts = []
    if not docs:
        raise DataError("data.path", path if path is not None else "<stdlib>", "corpus holds no non-empty text")
    return docs
