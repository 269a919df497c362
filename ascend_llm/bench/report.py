"""Shared benchmark output: an aligned text table on stdout and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from ascend_llm.store.files import write_file_atomic


def print_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | os.PathLike, name: str, rows: list[dict], **extra) -> Path:
    """Write rows plus machine facts atomically (store/files.write_file_atomic: temp file, fsync, rename); returns
    the path. OutputError (one line, exit 2) when the path cannot be written."""
    import mindspore

    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count(),
               "machine": platform.machine(), "python": platform.python_version(),
               "mindspore": mindspore.__version__, **extra, "rows": rows}
    return write_file_atomic(path, json.dumps(payload, indent=2), field="benchmark JSON")
