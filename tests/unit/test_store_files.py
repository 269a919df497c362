"""store/files.py, the one crash-safe writer: whole or nothing, never deleting what the toolkit did not write,
output problems as one OutputError, stale temporaries of dead processes cleaned. Real files; read-only and full
file systems are real tmpfs mounts (root only, skipped otherwise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ascend_llm.errors import OutputError
from ascend_llm.store.files import (
    MARKER,
    check_output_dir,
    clean_stale,
    pid_alive,
    temp_name,
    write_dir_atomic,
    write_file_atomic,
)


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_name(name: str, pid: int, kind: str = "tmp") -> str:
    """A temporary name as another process `pid` of this host would make it."""
    ours = temp_name(name, kind)
    host = ours.rsplit("-", 3)[1]
    return f".{name}.{kind}-{host}-{pid}-0badc0de"


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, size, read_only) -> path of a fresh tmpfs; unmounted after the test. Root only."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (read-only / full disk)")
    mounted = []

    def mount(name: str, size: str = "1m", read_only: bool = False):
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"mount -t tmpfs failed: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --- write_file_atomic -------------------------------------------------------------------------------------------

def test_write_file_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    assert write_file_atomic(target, "first 春\n") == target
    assert target.read_text(encoding="utf-8") == "first 春\n"
    write_file_atomic(target, b"second")
    assert target.read_text() == "second"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert listing(target.parent) == ["out.json"]


def test_write_file_writes_chunks_in_order(tmp_path):
    chunks = [b"ab", np.arange(3, dtype=np.uint8).tobytes(), memoryview(b"z")]
    write_file_atomic(tmp_path / "f", chunks)
    assert (tmp_path / "f").read_bytes() == b"ab\x00\x01\x02z"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_file_atomic(target, "new \udcff")  # a lone surrogate cannot be encoded
    assert target.read_text() == "old"

    def chunks():
        yield b"half"
        raise RuntimeError("producer failed mid-write")

    with pytest.raises(RuntimeError):
        write_file_atomic(target, chunks())
    assert target.read_text() == "old"
    assert listing(tmp_path) == ["out.txt"]


def test_write_file_onto_a_directory_or_under_a_file_is_one_output_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        write_file_atomic(tmp_path / "d", "x", field="--json")
    (tmp_path / "f").write_text("keep")
    with pytest.raises(OutputError, match=r"--json=.*f/x.json.*(not a directory|exists)") as info:
        write_file_atomic(tmp_path / "f" / "x.json", "x", field="--json")
    assert "\n" not in info.value.one_line()
    assert (tmp_path / "f").read_text() == "keep"


# --- write_dir_atomic: the output rule ---------------------------------------------------------------------------

def fill_one(tmp):
    (tmp / "model.bin").write_bytes(b"\x01\x02")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x.json").write_text("{}")


def test_write_dir_is_complete_shared_and_marked(tmp_path):
    out = write_dir_atomic(tmp_path / "q", fill_one)
    assert listing(out) == sorted([MARKER, "model.bin", "sub"])
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)  # mkdtemp would leave it 0700
    assert oct((out / "sub").stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "model.bin").stat().st_mode & 0o777) == oct(0o644)
    assert listing(tmp_path) == ["q"]


def test_an_empty_existing_dir_is_filled(tmp_path):
    (tmp_path / "q").mkdir()
    write_dir_atomic(tmp_path / "q", fill_one)
    assert (tmp_path / "q" / "model.bin").is_file()


def test_a_non_empty_dir_is_refused_without_overwrite_and_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(OutputError) as info:
        write_dir_atomic(mine, fill_one, field="--out")
    line = info.value.one_line()
    assert "--out" in line and str(mine) in line and "--overwrite" in line
    assert listing(mine) == ["notes.txt"] and listing(tmp_path) == ["mine"]


def test_overwrite_replaces_only_what_the_toolkit_wrote(tmp_path):
    out = write_dir_atomic(tmp_path / "q", fill_one)
    write_dir_atomic(out, lambda tmp: (tmp / "new.bin").write_bytes(b"3"), overwrite=True)
    assert listing(out) == sorted([MARKER, "new.bin"])
    assert listing(tmp_path) == ["q"]  # the old copy set aside and removed
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")  # looks like a model, but ascend_llm did not write it
    with pytest.raises(OutputError, match="did not write"):
        write_dir_atomic(foreign, fill_one, overwrite=True)
    assert listing(foreign) == ["config.json"]


def test_overwrite_never_deletes_a_file_added_to_the_toolkits_output(tmp_path):
    out = write_dir_atomic(tmp_path / "q", fill_one)
    assert json.loads((out / MARKER).read_text())["files"] == ["model.bin", "sub/x.json"]
    (out / "sub" / "my_notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="sub/my_notes.txt"):
        write_dir_atomic(out, fill_one, overwrite=True)
    assert (out / "sub" / "my_notes.txt").read_text() == "mine"


def test_overwrite_accepts_the_toolkits_quantized_layout_written_before_the_marker(tmp_path):
    old = tmp_path / "q"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model": {}, "quantization": {"bits": 8}}))
    write_dir_atomic(old, fill_one, overwrite=True)
    assert (old / "model.bin").is_file()


def marked(path):
    """A directory as write_dir_atomic leaves it: file x and MARKER listing it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"files": ["x"]}))
    (path / "x").write_text("x")
    return path


@pytest.mark.parametrize("case", ["cwd", "ancestor_of_cwd", "source", "holds_source", "run_ckpt", "run_metrics"])
def test_overwrite_never_replaces_the_cwd_the_source_or_a_run(tmp_path, monkeypatch, case):
    top = marked(tmp_path / "top")
    work = marked(top / "work")
    monkeypatch.chdir(work)
    box = marked(tmp_path / "box")  # written by the toolkit, but it holds the source
    source = marked(box / "src")
    target = {"cwd": work, "ancestor_of_cwd": top, "source": source, "holds_source": box}[case] \
        if not case.startswith("run") else marked(tmp_path / "run")
    if case == "run_ckpt":
        (target / "checkpoints").mkdir()
    if case == "run_metrics":
        (target / "metrics.jsonl").write_text("{}\n")
    before = sorted(str(p) for p in target.rglob("*"))
    want = {"cwd": "working directory", "ancestor_of_cwd": "working directory", "source": "source model",
            "holds_source": "source model", "run_ckpt": "training run", "run_metrics": "training run"}[case]
    with pytest.raises(OutputError, match=want):
        write_dir_atomic(target, fill_one, overwrite=True, protect=[source])
    with pytest.raises(OutputError, match=want):  # refused before any work, too
        check_output_dir(".." if case == "ancestor_of_cwd" else "." if case == "cwd" else target, overwrite=True,
                         protect=[source])
    assert sorted(str(p) for p in target.rglob("*")) == before


def test_an_empty_working_directory_is_never_the_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), "sub/.."):
        with pytest.raises(OutputError, match="working directory"):
            write_dir_atomic(out, fill_one)
    assert listing(tmp_path) == []
    assert write_dir_atomic("new/", fill_one) == Path("new/") and (tmp_path / "new" / "model.bin").is_file()


def test_output_is_a_file_or_below_a_file_or_a_symlink(tmp_path):
    (tmp_path / "f").write_text("keep")
    for path, why in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "out", "is a file, not a directory"),
                      (tmp_path / "f" / "a" / "out", "is a file, not a directory")):
        with pytest.raises(OutputError, match=why):
            write_dir_atomic(path, fill_one, field="--out")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="symbolic link"):
        write_dir_atomic(tmp_path / "link", fill_one)
    assert (tmp_path / "f").read_text() == "keep" and listing(tmp_path) == ["f", "link", "real"]


def test_a_failing_fill_leaves_nothing(tmp_path):
    def fill(tmp):
        (tmp / "half").write_bytes(b"x")
        raise KeyError("boom")

    with pytest.raises(KeyError):
        write_dir_atomic(tmp_path / "q", fill)
    assert listing(tmp_path) == []


def test_keep_existing_keeps_the_copy_another_process_finished(tmp_path):
    def fill(tmp):
        (tmp / "ours").write_text("1")
        marked(tmp_path / "cache")  # another process finishes first

    assert write_dir_atomic(tmp_path / "cache", fill, keep_existing=True) == tmp_path / "cache"
    assert listing(tmp_path / "cache") == sorted([MARKER, "x"]) and listing(tmp_path) == ["cache"]


# --- stale temporaries -------------------------------------------------------------------------------------------

def test_pid_alive():
    assert pid_alive(os.getpid()) and pid_alive(1)
    assert not pid_alive(dead_pid()) and not pid_alive(0) and not pid_alive(10**30)


def test_the_next_write_removes_temporaries_of_dead_processes_only(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    (tmp_path / stale_name("q", dead)).mkdir()
    (tmp_path / stale_name("q", dead) / "model.bin").write_bytes(b"x")
    (tmp_path / stale_name("f.json", dead)).write_text("torn")
    (tmp_path / stale_name("q2", alive)).mkdir()  # a live writer's temporary stays
    (tmp_path / ".q.tmp-notours").mkdir()  # not our naming: never touched
    write_dir_atomic(tmp_path / "q", fill_one)
    assert listing(tmp_path) == sorted(["q", stale_name("q2", alive), ".q.tmp-notours"])
    (tmp_path / stale_name("f.json", dead)).write_text("torn")
    write_file_atomic(tmp_path / "f.json", "{}")
    assert stale_name("f.json", dead) not in listing(tmp_path)


def test_a_replacement_interrupted_between_renames_is_recovered(tmp_path):
    aside = tmp_path / stale_name("q", dead_pid(), kind="old")
    marked(aside)
    assert clean_stale(tmp_path) == [aside]
    assert listing(tmp_path) == ["q"] and listing(tmp_path / "q") == sorted([MARKER, "x"])
    marked(tmp_path / stale_name("q", dead_pid(), kind="old"))  # the target exists: the copy set aside goes
    clean_stale(tmp_path)
    assert listing(tmp_path) == ["q"]


# --- read-only and full file systems (tmpfs) ---------------------------------------------------------------------

def test_read_only_file_system_is_one_line_before_any_work(mount_tmpfs):
    ro = mount_tmpfs("ro", read_only=True)
    calls = []
    with pytest.raises(OutputError) as info:
        write_dir_atomic(ro / "q", lambda tmp: calls.append(tmp), field="--out")
    assert calls == []
    line = info.value.one_line()
    assert "--out" in line and str(ro / "q") in line and "read-only file system" in line
    with pytest.raises(OutputError, match="read-only file system"):
        write_file_atomic(ro / "bench.json", "{}", field="--json")
    with pytest.raises(OutputError, match="read-only file system"):
        check_output_dir(ro / "a" / "b")


def test_full_disk_is_one_line_and_leaves_nothing(mount_tmpfs):
    full = mount_tmpfs("full", size="256k")
    (full / "old.json").write_text("old")

    def fill(tmp):
        (tmp / "big.bin").write_bytes(b"\0" * (1 << 20))

    with pytest.raises(OutputError) as info:
        write_dir_atomic(full / "q", fill, field="--out")
    assert "no space left on device" in info.value.one_line() and "--out" in info.value.one_line()
    with pytest.raises(OutputError, match="no space left"):
        write_file_atomic(full / "old.json", b"\0" * (1 << 20))
    assert listing(full) == ["old.json"] and (full / "old.json").read_text() == "old"


def test_a_checkpoint_on_a_full_disk_is_one_line_naming_train_output_dir(mount_tmpfs):
    from ascend_llm.train.checkpoint import list_checkpoints, save_model_checkpoint

    full = mount_tmpfs("full", size="256k")
    small = {"w": np.ones((4, 4), np.float32)}
    assert save_model_checkpoint(full / "run", 1, small, {"model": {}}) is not None
    with pytest.raises(OutputError) as info:
        save_model_checkpoint(full / "run", 2, {"w": np.ones((512, 512), np.float32)}, {"model": {}})
    assert "train.output_dir" in info.value.one_line() and "no space left" in info.value.one_line()
    assert [p.name for p in list_checkpoints(full / "run")] == ["step_00000001"]
    assert listing(full / "run" / "checkpoints") == ["step_00000001"]
