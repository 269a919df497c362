"""Checkpoints round-trip exactly, keep the last K, and corruption is detected."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.errors import CheckpointError
from ascend_llm.train.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def arrays(seed):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}


def test_round_trip_keep_last_and_corruption(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, arrays(step), {"adam_step": np.array(step, np.int32)},
                        {"position": step * 8, "seed": 1}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000030", "step_00000020"]
    model, optim, state = load_checkpoint(list_checkpoints(tmp_path)[0])
    for key, value in arrays(40).items():
        np.testing.assert_array_equal(model[key], value)
    assert int(optim["adam_step"]) == 40 and state["position"] == 320 and state["step"] == 40

    newest = list_checkpoints(tmp_path)[0] / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(newest.parent)
    messages = []
    path, (_, _, state) = latest_valid_checkpoint(tmp_path, report=messages.append)
    assert path.name == "step_00000030" and state["step"] == 30
    assert len(messages) == 1 and "step_00000040" in messages[0]

    (path / "state.json").write_text("{broken")
    path2, _ = latest_valid_checkpoint(tmp_path, report=messages.append)
    assert path2.name == "step_00000020"
