"""Checkpoints: saving and restoring a dict of named stateful parts, every compatibility check, retention.

Layout of `checkpoints/step_NNNNNNNN/` (format 2):
- `<part>.safetensors` for each part whose state is arrays (model, optimizer, precision, converters);
- `state.json`: {"format", "step", "run_id", "parts": {<part>: JSON state}, "files": {file: sha256}};
- copies of `files` handed to the manager (the tokenizer: `tokenizer.json`).
Tensor names are full parameter names and shapes are unsharded, whatever layout wrote them.

Writes are crash-safe (`store/files.py`): everything goes into a temporary directory; each file and the directory
are fsync'ed; then the directory is renamed into place. Replacing a checkpoint of the same step first renames
the old one aside, so a crash between the two renames leaves it recoverable (`recover_stale` renames it
back). A checkpoint holding a non-finite parameter or moment is never written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import save_file

from ascend_llm.errors import CheckpointError, ConfigError
from ascend_llm.store.checkpoints import (  # noqa: F401  (the format, re-exported for the trainer)
    FORMAT,
    STATE_FILE,
    checkpoint_config,
    checkpoint_dir,
    latest_valid_checkpoint,
    list_checkpoints,
    read_checkpoint,
    sha256_file,
)
from ascend_llm.store.files import finish_tree, install_dir, make_temp_dir, output_errors

if TYPE_CHECKING:  # a type only: `ascend-llm launch` checks train.output_dir without importing MindSpore
    from ascend_llm.train.state import Stateful

logger = logging.getLogger("ascend_llm.train")


def recover_stale(run_dir: Path) -> None:
    """Remove temporary directories of interrupted saves; rename back a checkpoint that a crash left set aside
    (`.step_N.old-*` while `step_N` is missing)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        name = path.name
        if name.startswith(".step_") and ".tmp-" in name:
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".step_") and ".old-" in name:
            final = root / name[1:name.index(".old-")]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, final)
                logger.warning("recovered checkpoint %s set aside by an interrupted save", final)


def _is_tensor_state(state: Mapping[str, Any]) -> bool:
    return bool(state) and all(isinstance(v, np.ndarray) for v in state.values())


def _first_nonfinite(arrays: Mapping[str, np.ndarray]) -> str | None:
    for name, value in arrays.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return name
    return None


def guard_fresh_run(run_dir: Path, overwrite: bool) -> None:
    """A fresh run (train.resume=none) must not mix with another run's files in train.output_dir.

    Raises ConfigError naming train.output_dir and its newest checkpoint unless `overwrite`, in which case the
    other run's checkpoints and metrics are removed first."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not found and not (metrics.is_file() and metrics.stat().st_size):
        return
    if not overwrite:
        held = f"checkpoint {found[0].name}" if found else "metrics.jsonl"
        raise ConfigError("train.output_dir", str(run_dir),
                          f"holds another run (newest: {held}); continue it with train.resume=auto, choose another "
                          "train.output_dir, or replace it with train.overwrite=true")
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", "sample.txt", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    logger.warning("train.overwrite=true: removed the previous run's checkpoints and metrics in %s", run_dir)


def check_model_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], source: str) -> None:
    """Every architecture field of the recipe's `model` group must equal the checkpoint's."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(f"{source}: model.{key}", saved[key],
                                  f"the checkpoint was trained with it; the recipe has {value}")


# What the saved adapters mean (models/lora.py: y = W x + (alpha / r) B A x on the `targets` sub-cells). Not here:
# lora.dropout (only masks the adapter's input while training) and lora.seed (only draws A before a resume loads it).
LORA_MEANING = {"enabled": "whether the checkpoint holds adapters or the whole model",
                "targets": "which sub-cells carry the saved adapters",
                "rank": "the shapes of A and B",
                "alpha": "the scaling alpha / r of every saved update"}


def check_lora_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], source: str) -> None:
    """The saved LoRA adapters must mean the same in this run: lora.enabled, lora.targets (as a set), lora.rank,
    lora.alpha equal, and, without model.pretrained, train.seed (it draws the frozen base the adapters were trained
    on; model.pretrained itself is a model field, see check_model_compatible).

    saved/current: resolved recipes (plain dicts) of the checkpoint and of this run; a recipe without a `lora` group
    (written before LoRA existed) counts as lora.enabled=false. Raises CheckpointError naming the field with the
    checkpoint's value and this run's value."""
    old, new = dict(saved.get("lora") or {"enabled": False}), dict(current.get("lora") or {"enabled": False})
    if not old.get("enabled") and not new.get("enabled"):
        return
    for key, meaning in LORA_MEANING.items():
        was, now = old.get(key), new.get(key)
        if key == "targets" and was is not None and now is not None:
            was, now = sorted(set(was)), sorted(set(now))
        if was != now:
            raise CheckpointError(f"{source}: lora.{key}", was, f"the checkpoint's adapters were trained with it "
                                  f"({meaning}); this run has {now}: resume with the checkpoint's value, or start a "
                                  "fresh run in another train.output_dir")
    if not (current.get("model") or {}).get("pretrained"):
        was, now = (saved.get("train") or {}).get("seed"), (current.get("train") or {}).get("seed")
        if was != now:
            raise CheckpointError(f"{source}: train.seed", was, f"draws the frozen base weights the checkpoint's "
                                  f"adapters were trained on (no model.pretrained); this run has {now}: resume "
                                  "with the checkpoint's seed")


DATA_FIELDS = {"seq_len": "data.seq_len", "data_seed": "data.seed", "corpus": "data.path"}


def check_data_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], source: str,
                          allow_data_change: bool) -> bool:
    """True when the saved data position applies to this run. The tokenizer must always match (embedding rows
    are token ids); another seq_len, data seed or corpus is refused unless `allow_data_change`, in which case
    the data position restarts at 0 (returns False)."""
    tokenizer = Path(source) / "tokenizer.json"
    if saved.get("tokenizer_sha256") != current.get("tokenizer_sha256"):
        raise CheckpointError(f"{source}: data.tokenizer", current.get("tokenizer"),
                              f"the checkpoint was trained with another tokenizer (sha256 "
                              f"{str(saved.get('tokenizer_sha256'))[:12]}, this run's is "
                              f"{str(current.get('tokenizer_sha256'))[:12]}); reuse the checkpoint's with "
                              f"data.tokenizer={tokenizer}")
    changed = [(DATA_FIELDS[k], saved.get(k), current.get(k)) for k in DATA_FIELDS if saved.get(k) != current.get(k)]
    if not changed:
        return True
    field_name, old, new = changed[0]
    if not allow_data_change:
        raise CheckpointError(f"{source}: {field_name}", old,
                              f"the checkpoint was trained with it; this run has {new}; to continue on other data "
                              "pass train.allow_data_change=true (the data position then restarts at 0)")
    logger.warning("train.allow_data_change=true: %s changed (%s -> %s); data position restarts at 0",
                   field_name, old, new)
    return False


class CheckpointManager:
    """Save and restore named stateful parts under `run_dir/checkpoints/`.

    parts: {"model": ..., "optimizer": ..., "precision": ..., "data": DataState, "run": RunState, ...}; the
    "run" and "data" parts are required (they carry the run id and the compatibility identity).
    files: extra files copied into every checkpoint, e.g. {"tokenizer.json": path}.
    keep_last: newest checkpoints of this run kept; retention never removes the one just written and never
    touches another run's checkpoints.
    writer: whether this rank writes. `save` is called on every rank (a sharded part gathers its state with
    collectives); only the writer touches the file system."""

    def __init__(self, run_dir: Path, parts: dict[str, Stateful], keep_last: int,
                 files: Mapping[str, Path] | None = None, writer: bool = True):
        self.run_dir, self.parts, self.keep_last = Path(run_dir), parts, keep_last
        self.files = dict(files or {})
        self.writer = writer

    def save(self, step: int) -> Path | None:
        """Write checkpoint `step`. Call on every rank. Returns its path (writer), or None (other ranks, or a
        state that is not finite). OutputError naming train.output_dir when the disk is full or read-only
        (nothing half-written)."""
        states = {name: part.state_dict() for name, part in self.parts.items()}
        if not self.writer:
            return None
        tensor_parts = [name for name, st in states.items() if _is_tensor_state(st)]
        for name in tensor_parts:
            bad = _first_nonfinite(states[name])
            if bad:
                logger.warning("step %d: not checkpointing: %s %s holds non-finite values", step, name, bad)
                return None
        root = checkpoint_dir(self.run_dir)
        with output_errors("train.output_dir", self.run_dir):
            tmp = make_temp_dir(root, f"step_{step:08d}")
            try:
                self._write(tmp, step, states, tensor_parts)
                final = install_dir(tmp, root / f"step_{step:08d}", replace=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self._retain(final)
        return final

    def _write(self, tmp: Path, step: int, states: dict, tensor_parts: list[str]) -> None:
        names = []
        for name in tensor_parts:
            save_file(states[name], str(tmp / f"{name}.safetensors"))
            names.append(f"{name}.safetensors")
        for name, source in self.files.items():
            shutil.copyfile(source, tmp / name)
            names.append(name)
        meta = {"format": FORMAT, "step": step, "run_id": self.parts["run"].run_id, "tensor_parts": tensor_parts,
                "parts": {k: v for k, v in states.items() if k not in tensor_parts and not _is_empty_tensor(v)},
                "files": {name: sha256_file(tmp / name) for name in names}}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2, default=str))
        finish_tree(tmp)  # 0644/0755, every file and the directory fsync'ed before the rename

    def _retain(self, just_written: Path) -> None:
        ours = [p for p in list_checkpoints(self.run_dir) if _run_id(p) == self.parts["run"].run_id]
        for old in ours[self.keep_last:]:
            if old != just_written:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, resume: str, allow_data_change: bool = False) -> int:
        """Load the checkpoint train.resume selects ("none" | "auto" | a directory); returns its step (0 when
        nothing is loaded). Every rank reads the same files. Raises CheckpointError for an explicit directory
        that does not verify or any incompatibility (model, tokenizer, data)."""
        if self.writer:
            recover_stale(self.run_dir)
        if resume == "none":
            return 0
        if resume == "auto":
            found = latest_valid_checkpoint(self.run_dir)
            if found is None:
                logger.info("train.resume=auto: no valid checkpoint in %s; starting from step 0", self.run_dir)
                return 0
            path, (meta, tensors) = found
        else:
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError("train.resume", resume, "must be none, auto or a checkpoint directory")
            meta, tensors = read_checkpoint(path)
        self._load(path, meta, tensors, allow_data_change)
        logger.info("resumed from %s at step %d", path, meta["step"])
        return int(meta["step"])

    def _load(self, path: Path, meta: dict, tensors: dict, allow_data_change: bool) -> None:
        saved = meta["parts"]
        check_model_compatible(saved["run"]["config"].get("model", {}), self.parts["run"].config.get("model", {}),
                               str(path))
        check_lora_compatible(saved["run"]["config"], self.parts["run"].config, str(path))
        keep_position = check_data_compatible(saved["data"], self.parts["data"].identity, str(path),
                                              allow_data_change)
        for name, part in self.parts.items():
            if name == "data" and not keep_position:
                continue
            if name in tensors:
                part.load_state_dict(tensors[name])
            elif name in saved:
                part.load_state_dict(saved[name])
            else:
                part.load_state_dict({})


def _is_empty_tensor(state: Any) -> bool:
    return isinstance(state, dict) and not state


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


class _Arrays:
    """A fixed dict of arrays as a stateful part (weights produced outside the trainer)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.arrays

    def load_state_dict(self, state: dict) -> None:
        self.arrays = dict(state)


def save_model_checkpoint(run_dir: Path, step: int, model: Mapping[str, np.ndarray], config: dict,
                          tokenizer: Path | None = None) -> Path | None:
    """Write `run_dir/checkpoints/step_N` holding only model weights, the resolved recipe `config` (at least
    {"model": ...}) and optionally a tokenizer.json copy: the layout readers (convert, eval, serve) take, for
    weights produced outside the trainer (conversions, tests). Same atomic write as training checkpoints."""
    from ascend_llm.train.state import DataState, RunState

    parts = {"model": _Arrays(model), "data": DataState({}), "run": RunState(dict(config), seed=0)}
    files = {"tokenizer.json": Path(tokenizer)} if tokenizer else None
    return CheckpointManager(run_dir, parts, keep_last=1_000_000, files=files).save(step)
