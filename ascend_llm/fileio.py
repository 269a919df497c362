"""Crash-safe small-file writes: the whole text or nothing (house rule: temp file, fsync, rename)."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` so a crash leaves the old file or the new one, never a torn one: a temp
    file beside it (unique per process), fsync, then rename over `path`. Creates missing parent directories.
    Returns the path. Raises OSError from the filesystem."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
