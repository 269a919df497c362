"""CheckpointManager: named parts round-trip exactly, retention, corruption, crash safety, compatibility checks,
the fresh-run guard. Pure NumPy parts (no MindSpore) so each behaviour is checked in isolation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ascend_llm.errors import CheckpointError, ConfigError
from ascend_llm.train.checkpoint import (
    CheckpointManager,
    guard_fresh_run,
    latest_valid_checkpoint,
    list_checkpoints,
    read_checkpoint,
    recover_stale,
)
from ascend_llm.train.state import DataState, RunState


class ArrayPart:
    """A stand-in for the model or optimizer: a dict of arrays, loaded by copy."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.arrays = {"a.weight": rng.normal(size=(3, 4)).astype(np.float32),
                       "b": rng.normal(size=5).astype(np.float32)}

    def state_dict(self):
        return {k: v.copy() for k, v in self.arrays.items()}

    def load_state_dict(self, state):
        self.arrays = {k: np.asarray(v).copy() for k, v in state.items()}


IDENTITY = {"tokenizer_sha256": "t" * 64, "tokenizer": "trained", "seq_len": 64, "data_seed": 1, "corpus": "c (9)"}


def manager(run_dir, seed=0, keep_last=3, identity=None, model_cfg=None, tokenizer=None):
    parts = {"model": ArrayPart(seed), "optimizer": ArrayPart(seed + 100),
             "data": DataState(dict(identity or IDENTITY)),
             "run": RunState({"model": model_cfg or {"dim": 8}}, seed=seed)}
    files = {"tokenizer.json": tokenizer} if tokenizer else None
    return CheckpointManager(run_dir, parts, keep_last, files=files)


def test_round_trip_of_every_part_and_keep_last(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"v": 1}')
    saver = manager(tmp_path, seed=1, tokenizer=tok)
    for step in (10, 20, 30, 40):
        saver.parts["data"].position = step * 8
        saver.parts["model"].arrays["b"][:] = step
        saver.save(step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000030", "step_00000020"]
    assert (list_checkpoints(tmp_path)[0] / "tokenizer.json").read_text() == '{"v": 1}'

    loader = manager(tmp_path, seed=7)
    assert loader.restore("auto") == 40
    np.testing.assert_array_equal(loader.parts["model"].arrays["b"], np.full(5, 40, np.float32))
    np.testing.assert_array_equal(loader.parts["model"].arrays["a.weight"], ArrayPart(1).arrays["a.weight"])
    np.testing.assert_array_equal(loader.parts["optimizer"].arrays["b"], ArrayPart(101).arrays["b"])
    assert loader.parts["data"].position == 320
    assert loader.parts["run"].run_id == saver.parts["run"].run_id  # a resumed run keeps its id


def test_corruption_falls_back_and_explicit_corrupt_checkpoint_is_an_error(tmp_path):
    saver = manager(tmp_path)
    for step in (10, 20, 30):
        saver.save(step)
    newest = list_checkpoints(tmp_path)[0] / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        read_checkpoint(newest.parent)
    messages = []
    path, (meta, _) = latest_valid_checkpoint(tmp_path, report=messages.append)
    assert path.name == "step_00000020" and meta["step"] == 20
    assert len(messages) == 1 and "step_00000030" in messages[0]
    with pytest.raises(CheckpointError):
        manager(tmp_path).restore(str(newest.parent))
    (path / "state.json").write_text("{broken")
    assert latest_valid_checkpoint(tmp_path, report=messages.append)[0].name == "step_00000010"


def test_retention_never_removes_what_it_just_wrote_nor_another_runs_checkpoints(tmp_path):
    old = manager(tmp_path, keep_last=3)
    for step in (20, 30, 40):
        old.save(step)
    new = manager(tmp_path, keep_last=3)  # another run id, lower step numbers (written with train.overwrite)
    for step in (1, 2, 3, 4):
        assert new.save(step) is not None
        assert (tmp_path / "checkpoints" / f"step_{step:08d}").is_dir()
    names = sorted(p.name for p in list_checkpoints(tmp_path))
    assert names == ["step_00000002", "step_00000003", "step_00000004", "step_00000020", "step_00000030",
                     "step_00000040"]


def test_non_finite_state_is_never_written(tmp_path):
    saver = manager(tmp_path)
    saver.parts["optimizer"].arrays["b"][2] = np.nan
    assert saver.save(5) is None
    assert list_checkpoints(tmp_path) == []


def test_replacing_a_checkpoint_and_recovering_from_a_crash_between_renames(tmp_path):
    saver = manager(tmp_path)
    saver.save(10)
    saver.parts["model"].arrays["b"][:] = 3.0
    saver.save(10)  # the same step again (e.g. after resuming from an earlier checkpoint)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000010"]
    meta, tensors = read_checkpoint(tmp_path / "checkpoints" / "step_00000010")
    np.testing.assert_array_equal(tensors["model"]["b"], np.full(5, 3.0, np.float32))
    # A crash after the old one was set aside and before the new one was renamed in: nothing is lost.
    root = tmp_path / "checkpoints"
    os.rename(root / "step_00000010", root / ".step_00000010.old-123")
    (root / ".step_00000011.tmp-abc").mkdir()
    recover_stale(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000010"]


def test_state_files_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    manager(tmp_path).save(1)
    names = [os.path.basename(p) for p in synced]
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= set(names)
    assert "checkpoints" in names  # the parent directory, after the rename
    assert any(n.startswith(".step_00000001.tmp-") for n in names)  # the directory, before the rename


@pytest.mark.parametrize("change,field", [
    ({"tokenizer_sha256": "u" * 64}, "data.tokenizer"),
    ({"seq_len": 128}, "data.seq_len"),
    ({"data_seed": 2}, "data.seed"),
    ({"corpus": "other (5)"}, "data.path"),
])
def test_resume_refuses_other_data_naming_the_field(tmp_path, change, field):
    manager(tmp_path).save(5)
    with pytest.raises(CheckpointError) as info:
        manager(tmp_path, identity={**IDENTITY, **change}).restore("auto")
    assert field in info.value.field
    if field == "data.tokenizer":
        assert "data.tokenizer=" in str(info.value) and "tokenizer.json" in str(info.value)


def test_allow_data_change_restarts_the_position_but_never_accepts_another_tokenizer(tmp_path):
    saver = manager(tmp_path)
    saver.parts["data"].position = 64
    saver.save(5)
    loader = manager(tmp_path, identity={**IDENTITY, "corpus": "other (5)"})
    assert loader.restore("auto", allow_data_change=True) == 5
    assert loader.parts["data"].position == 0
    with pytest.raises(CheckpointError):
        manager(tmp_path, identity={**IDENTITY, "tokenizer_sha256": "u" * 64}).restore("auto", allow_data_change=True)


def test_resume_refuses_another_model(tmp_path):
    manager(tmp_path).save(5)
    with pytest.raises(CheckpointError, match="model.dim"):
        manager(tmp_path, model_cfg={"dim": 16}).restore("auto")


def test_fresh_run_guard(tmp_path):
    guard_fresh_run(tmp_path, overwrite=False)  # empty: fine
    manager(tmp_path).save(7)
    with pytest.raises(ConfigError) as info:
        guard_fresh_run(tmp_path, overwrite=False)
    assert info.value.field == "train.output_dir" and "step_00000007" in str(info.value)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    guard_fresh_run(tmp_path, overwrite=True)
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()


def test_format_1_checkpoints_are_named_as_such(tmp_path):
    old = tmp_path / "checkpoints" / "step_00000005"
    old.mkdir(parents=True)
    (old / "state.json").write_text(json.dumps({"step": 5, "sha256": {"model.safetensors": "x"}}))
    with pytest.raises(CheckpointError, match="format 1"):
        read_checkpoint(old)
