"""Checkpoints: one directory per step holding safetensors for the model and optimizer, plus state.json.

state.json records the step, data position, seed, resolved config, extra trainer state and the SHA-256 of
each tensor file, so corruption is detected on resume. A checkpoint is written into a temporary directory
and renamed into place (complete or absent); only the newest `keep_last` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ascend_llm.errors import CheckpointError

FILES = ("model.safetensors", "optimizer.safetensors")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
                    state: dict, keep_last: int) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}.tmp-", dir=root))
    try:
        save_file(model, str(tmp / FILES[0]))
        save_file(optimizer, str(tmp / FILES[1]))
        record = dict(state, step=step, sha256={name: _sha256(tmp / name) for name in FILES})
        (tmp / "state.json").write_text(json.dumps(record, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, newest step first (temporary directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Read and verify a checkpoint; CheckpointError names the file and what is wrong."""
    path = Path(path)
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        expected = state["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(str(state_file), "unreadable", f"state.json must be valid JSON with sha256 ({exc})")
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(str(file), "missing", "a checkpoint holds model and optimizer safetensors")
        actual = _sha256(file)
        if actual != expected.get(name):
            raise CheckpointError(str(file), f"sha256 {actual[:12]}",
                                  f"must match state.json ({str(expected.get(name))[:12]}): file is corrupted")
    try:
        return load_file(str(path / FILES[0])), load_file(str(path / FILES[1])), state
    except Exception as exc:  # safetensors raises its own error types on malformed files
        raise CheckpointError(str(path), "unreadable", f"safetensors failed to load ({exc})") from None


def latest_valid_checkpoint(run_dir: Path, report=print):
    """Newest checkpoint that verifies, reporting each corrupted one skipped; None when there is none."""
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            report(f"{exc.one_line()}; skipping to the previous checkpoint")
    return None
