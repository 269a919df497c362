"""The toolkit checkpoint format, read side: where a checkpoint's files are, how they are verified, what
`state.json` records. Below `train/` (which writes checkpoints) and `interop/` (which opens them).

Layout of `<run>/checkpoints/step_NNNNNNNN/` (format 2): `<part>.safetensors` per array part, `state.json`
{"format", "step", "run_id", "parts": {<part>: JSON state}, "tensor_parts", "files": {file: sha256}}, and copies of
the run's text files (tokenizer.json, ...). File names in `state.json` must stay inside the step directory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from ascend_llm.errors import CheckpointError
from ascend_llm.store.files import is_plain_relative, sha256_file

logger = logging.getLogger("ascend_llm.train")
FORMAT = 2
STATE_FILE = "state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, newest step first (temporary and set-aside directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def _inside(root: Path, name: object) -> Path:
    """root/name, refusing a name that is not a plain relative path inside root (`../x`, `/abs`, `a/../../b`)."""
    if not is_plain_relative(name):
        raise CheckpointError(f"{root / STATE_FILE}:files", name, "must name a file inside the checkpoint directory")
    return root / name


def read_checkpoint(path: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Verify and read one checkpoint: (state.json, {part: arrays}). CheckpointError names the file and what is
    wrong (unreadable, missing, checksum mismatch, older format)."""
    path = Path(path)
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        expected = meta["files"]
        if not isinstance(expected, dict) or not isinstance(meta.get("tensor_parts", []), list):
            raise TypeError("files must be an object and tensor_parts a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if (path / STATE_FILE).is_file() and "sha256" in (path / STATE_FILE).read_text():
            raise CheckpointError(str(path), "format 1", "written by an older ascend_llm; this version reads "
                                  "format 2 (start a fresh run or use the release that wrote it)") from None
        raise CheckpointError(str(path / STATE_FILE), "unreadable", f"must be valid JSON with files ({exc})") from None
    for name, digest in expected.items():
        file = _inside(path, name)
        if not file.is_file():
            raise CheckpointError(str(file), "missing", "listed in state.json but absent")
        if sha256_file(file) != digest:
            raise CheckpointError(str(file), "sha256 mismatch", f"must match state.json ({digest[:12]}): corrupted")
    tensors = {}
    for part in meta.get("tensor_parts", []):
        try:
            tensors[part] = load_file(str(_inside(path, f"{part}.safetensors")))
        except Exception as exc:  # safetensors raises its own error types on malformed files
            raise CheckpointError(str(path / f"{part}.safetensors"), "unreadable", f"safetensors: {exc}") from None
    return meta, tensors


def latest_valid_checkpoint(run_dir: Path, report: Callable[[str], None] = logger.warning):
    """(path, (meta, tensors)) of the newest checkpoint that verifies, reporting each one skipped; or None."""
    for path in list_checkpoints(run_dir):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as exc:
            report(f"{exc.one_line()}; skipping to the previous checkpoint")
    return None


def checkpoint_config(meta: Mapping[str, Any]) -> dict:
    """The resolved recipe (a plain dict) a checkpoint's state.json records. KeyError when absent."""
    return meta["parts"]["run"]["config"]
