"""write_file_atomic: the whole new text or the old file, never a torn one, and no temp files left behind."""

from __future__ import annotations

import pytest

from ascend_llm.store.files import write_file_atomic


def test_writes_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert write_file_atomic(target, "first 春\n") == target
    assert target.read_text(encoding="utf-8") == "first 春\n"
    write_file_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_file_atomic(target, "new \udcff")  # a lone surrogate cannot be encoded: fails mid-write
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
