"""Where the CLI writes (`quantize --out/--hf-gptq`, `convert --output`, `prepare --output`): it never deletes what
the toolkit did not write, and an output it cannot write (a file, below a file, read-only, full) is one line naming
the path and the cause with exit 2, nothing half-written and no temporary left. Real commands on the tiny HF
fixtures, in-process through `ascend_llm.cli.main.main` (the entry point of `ascend-llm`) and, where the process
matters (exit status, a SIGKILL), as real processes; read-only and full file systems are real tmpfs mounts (root
only, skipped otherwise with the reason)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit import test_store_files

mount_tmpfs = test_store_files.mount_tmpfs  # the real tmpfs mounts (root only), shared with test_store_files

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"
MODEL = FIXTURES / "llama_gqa"
pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason=f"fixture absent: {MODEL}")
MARKER = ".ascend_llm_output.json"
IN_PROCESS = True  # switched off by the `process` fixture


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`ascend-llm ARGV` in `cwd`: in-process (main(argv), stderr captured) or as a real process."""
    argv = [str(a) for a in argv]
    if not IN_PROCESS:
        env = {**os.environ, "GLOG_v": "3"}
        return subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
    from ascend_llm.cli.main import main

    old = Path.cwd()
    err = io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(argv, code, "", err.getvalue())


@pytest.fixture
def process():
    """Run the CLI as real processes in this test."""
    global IN_PROCESS
    IN_PROCESS = False
    yield
    IN_PROCESS = True


def quantize(out, *extra, cwd: Path, model: Path = MODEL) -> subprocess.CompletedProcess:
    return run("quantize", model, "--out", out, "--bits", "8", *extra, cwd=cwd)


def one_line(done: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with exit 2 and exactly one non-empty stderr line holding every word."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder of the user's own files."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "config.json").write_text("{}")
    return mine


@pytest.mark.integration
@pytest.mark.usefixtures("process")
def test_quantize_process_never_deletes_a_folder_it_did_not_write(tmp_path, folder):
    before = tree(folder)
    one_line(quantize(folder, cwd=tmp_path), "--out", str(folder), "--overwrite")
    assert tree(folder) == before and entries(tmp_path) == ["mine"]


@pytest.mark.parametrize("flag", ["--out", "--hf-gptq"])
def test_quantize_never_deletes_a_folder_it_did_not_write(tmp_path, folder, flag):
    before = tree(folder)
    argv = ("q", "--hf-gptq", folder) if flag == "--hf-gptq" else (folder,)
    one_line(quantize(*argv, cwd=tmp_path), flag, str(folder), "--overwrite")
    one_line(quantize(*argv, "--overwrite", cwd=tmp_path), flag, str(folder), "did not write")
    assert tree(folder) == before
    assert entries(tmp_path) == ["mine"]  # refused before anything was written, no temporary left


def test_quantize_overwrite_replaces_its_own_output(tmp_path):
    assert quantize("q", cwd=tmp_path).returncode == 0
    first = tree(tmp_path / "q")
    assert MARKER in first and "model.safetensors" in first
    one_line(quantize("q", cwd=tmp_path), "--out", "q", "--overwrite")
    assert tree(tmp_path / "q") == first
    done = quantize("q", "--overwrite", "--group-size", "32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["group_size"] == 32
    assert entries(tmp_path) == ["q"]
    (tmp_path / "q" / "notes.txt").write_text("mine")  # a file the user added to the toolkit's output
    one_line(quantize("q", "--overwrite", cwd=tmp_path), "--out", "notes.txt", "did not write")
    assert (tmp_path / "q" / "notes.txt").read_text() == "mine"


def test_quantize_overwrite_refuses_cwd_ancestor_source_and_run(tmp_path):
    assert quantize("q", cwd=tmp_path).returncode == 0  # a directory the toolkit wrote, used as the cwd
    inner = tmp_path / "q"
    (inner / "sub").mkdir()
    before = tree(tmp_path)
    one_line(quantize(".", "--overwrite", cwd=inner), "--out", "working directory")
    one_line(quantize("..", "--overwrite", cwd=inner / "sub"), "--out", "working directory")
    model = shutil.copytree(MODEL, tmp_path / "model")
    one_line(quantize(model, "--overwrite", cwd=tmp_path, model=model), "--out", "source model")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / MARKER).write_text("{}")
    one_line(quantize(run_dir, "--overwrite", cwd=tmp_path), "--out", "training run")
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    assert (run_dir / "metrics.jsonl").is_file() and (model / "config.json").is_file()


def test_convert_refuses_non_empty_and_overwrites_only_its_own(tmp_path, folder):
    before = tree(folder)
    one_line(run("convert", MODEL, "--to", "hf", "--output", folder, cwd=tmp_path), "--output", "--overwrite")
    one_line(run("convert", MODEL, "--to", "hf", "--output", folder, "--overwrite", cwd=tmp_path), "did not write")
    assert tree(folder) == before
    assert run("convert", MODEL, "--to", "hf", "--output", "h", cwd=tmp_path).returncode == 0
    done = run("convert", MODEL, "--to", "hf", "--output", "h", "--dtype", "fp32", "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "h" / "config.json").read_text())["torch_dtype"] == "float32"
    assert entries(tmp_path) == ["h", "mine"]


CORPUS = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。\n" * 100


def prepare(out, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "c.txt").write_text(CORPUS, encoding="utf-8")
    return run("prepare", "data.path=c.txt", "data.vocab_size=300", f"data.cache_dir={cwd / 'cache'}",
               "--output", out, "--no-progress", cwd=cwd)


def write_to(verb: str, out, cwd: Path) -> subprocess.CompletedProcess:
    """`quantize --out`, `convert --output` or `prepare --output` into `out`."""
    if verb == "quantize":
        return quantize(out, cwd=cwd)
    if verb == "convert":
        return run("convert", MODEL, "--to", "hf", "--output", out, cwd=cwd)
    return prepare(out, cwd)


@pytest.mark.parametrize("verb", ["quantize", "convert", "prepare"])
def test_an_output_that_is_a_file_or_below_one_is_one_line(tmp_path, verb):
    (tmp_path / "file").write_text("keep")
    for out, cause in (("file", "is a file"), ("file/x", "is a file, not a directory")):
        one_line(write_to(verb, out, tmp_path), out, cause)
    assert (tmp_path / "file").read_text() == "keep"
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("verb", ["quantize", "convert", "prepare"])
def test_read_only_and_full_output_folders_are_one_line(tmp_path, mount_tmpfs, verb):
    check_read_only_and_full(tmp_path, mount_tmpfs, verb)


@pytest.mark.integration
@pytest.mark.usefixtures("process")
def test_read_only_and_full_output_folders_in_a_process(tmp_path, mount_tmpfs):
    check_read_only_and_full(tmp_path, mount_tmpfs, "quantize")


def check_read_only_and_full(tmp_path, mount_tmpfs, verb):
    ro = mount_tmpfs("ro", "1m", read_only=True)
    full = mount_tmpfs("full", "128k")  # the int8 copy is ~430 KB, the bf16 export ~350 KB, the corpus ~90 KB
    (full / "pad").write_bytes(b"\0" * (112 << 10)) if verb == "prepare" else None
    before = entries(full)
    for out, cause in ((ro / "o", "read-only file system"), (full / "o", "no space left on device")):
        one_line(write_to(verb, out, tmp_path), str(out), cause)
    assert entries(full) == before and entries(ro) == []  # nothing half-written, no temporary left


CHILD = """
import sys, time
from pathlib import Path
from ascend_llm.store.files import write_dir_atomic

def fill(tmp):
    (tmp / "model.safetensors").write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(600)

write_dir_atomic(Path(sys.argv[1]), fill, field="--out")
"""


@pytest.mark.integration
def test_a_killed_writer_leaves_a_temporary_the_next_quantize_removes(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "q")], stdout=subprocess.PIPE, text=True)
    temp = Path(child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert temp.is_dir() and temp.name.startswith(".q.tmp-") and f"-{child.pid}-" in temp.name
    assert entries(tmp_path) == [temp.name]  # the kill left it (and no q)
    done = quantize("q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert entries(tmp_path) == ["q"]


@pytest.mark.integration
def test_a_quantize_killed_mid_write_leaves_nothing_torn(tmp_path):
    """SIGKILL a real `ascend-llm quantize` as soon as its temporary holds a file: no `q` (or a complete one); the
    next run into the same folder removes the temporary the kill left and writes `q`."""
    env = {**os.environ, "GLOG_v": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "ascend_llm.cli.main", "quantize", str(MODEL), "--out", "q",
                             "--bits", "8"], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    deadline, killed = time.monotonic() + 240, False
    while time.monotonic() < deadline and proc.poll() is None and not killed:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]
        if any(p.is_dir() and any(p.iterdir()) for p in temps):
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.002)
    proc.wait()
    if (tmp_path / "q").exists():  # the kill came after the rename
        assert {"model.safetensors", "config.json", MARKER} <= set(entries(tmp_path / "q"))
        shutil.rmtree(tmp_path / "q")
    elif killed:
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.tmp-")]  # what the kill left
    done = quantize("q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert entries(tmp_path) == ["q"]


@pytest.mark.integration
@pytest.mark.usefixtures("process")
def test_train_on_a_read_only_or_full_output_dir_is_one_line(tmp_path, mount_tmpfs):
    """Case 14: `train` into a read-only train.output_dir, and into one that fills up at the second checkpoint
    (a debug checkpoint is ~1.9 MB on a 3 MB tmpfs): one line naming train.output_dir, exit 2; the first
    checkpoint stays whole and no temporary is left."""
    ro, full = mount_tmpfs("ro", "1m", read_only=True), mount_tmpfs("full", "3m")
    smoke = ["debug=smoke", "train.num_steps=2", "train.ckpt_every=1", "train.val_batches=0", "train.progress=false",
             f"data.cache_dir={tmp_path / 'cache'}"]
    one_line(run("train", *smoke, f"train.output_dir={ro / 'run'}", cwd=tmp_path), "train.output_dir",
             str(ro / "run"), "read-only file system")
    done = run("train", *smoke, f"train.output_dir={full / 'run'}", cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.startswith("output error")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and "train.output_dir" in lines[0] and "no space left on device" in lines[0]
    assert entries(full / "run" / "checkpoints") == ["step_00000001"]
    from ascend_llm.store.checkpoints import read_checkpoint

    assert read_checkpoint(full / "run" / "checkpoints" / "step_00000001")[0]["step"] == 1
