"""Hostile or broken model files: one UserInputError naming the file and the field, no traceback, nothing
allocated beyond what the files hold, and no file name that leaves the directory. Every hostile file is written
here by hand (bytes), starting from the tiny Hugging Face fixtures; a few kinds go through the real CLI
(`ascend-llm eval` / `generate` / `quantize`), the rest through the library readers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ascend_llm.errors import UserInputError

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"
SINGLE = FIXTURES / "qwen2_tied"  # one model.safetensors
SHARDED = FIXTURES / "llama_gqa"  # three shards and model.safetensors.index.json
pytestmark = pytest.mark.skipif(not SINGLE.is_dir() or not SHARDED.is_dir(), reason=f"fixtures absent: {FIXTURES}")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in [dst, *dst.iterdir()]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return dst


def split(raw: bytes) -> tuple[dict, bytes]:
    """(header, data) of safetensors bytes, parsed here by hand (the spec: u64 LE size, JSON, data)."""
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def join(header: object, data: bytes, size: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if size is None else size) + text + data


def edit_weights(change):
    """A hostile model.safetensors: change(header, data) -> bytes of the whole file."""
    def apply(root: Path) -> None:
        file = root / "model.safetensors"
        header, data = split(file.read_bytes())
        file.write_bytes(change(header, data))
    return apply


def edit_json(name: str, change):
    """A hostile JSON file: change(value) edits it in place (returns None), returns a new value, or text."""
    def apply(root: Path) -> None:
        file = root / name
        raw = json.loads(file.read_text())
        value = change(raw)
        file.write_text(value if isinstance(value, str) else json.dumps(raw if value is None else value))
    return apply


def edit_config(change):
    return edit_json("config.json", change)


def edit_index(change):
    return edit_json("model.safetensors.index.json", change)


def write(name: str, text: str):
    return lambda root: (root / name).write_text(text)


EMBED, NORM0, NORM1 = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                       "model.layers.0.post_attention_layernorm.weight")


def _set(header: dict, name: str, key: str, value) -> dict:
    header[name][key] = value
    return header


# (model, hostile edit, file named, field named)
KINDS = {
    "header size 2^63": (SINGLE, edit_weights(lambda h, d: struct.pack("<Q", 2**63) + b"{}"),
                         "model.safetensors", "header size"),
    "header size past the end": (SINGLE, edit_weights(lambda h, d: join(h, d, size=len(json.dumps(h)) + len(d) + 9)),
                                 "model.safetensors", "header size"),
    "shorter than 8 bytes": (SINGLE, edit_weights(lambda h, d: b"\x07\x00"), "model.safetensors", "header size"),
    "header not JSON": (SINGLE, edit_weights(lambda h, d: struct.pack("<Q", 6) + b"{nope}" + d),
                        "model.safetensors", "header"),
    "header a list": (SINGLE, edit_weights(lambda h, d: join([1, 2], d)), "model.safetensors", "header"),
    "entry not an object": (SINGLE, edit_weights(lambda h, d: join({**h, NORM0: 5}, d)), "model.safetensors", NORM0),
    "bad dtype": (SINGLE, edit_weights(lambda h, d: join(_set(h, NORM0, "dtype", "F99"), d)),
                  "model.safetensors", f"{NORM0}.dtype"),
    "negative shape": (SINGLE, edit_weights(lambda h, d: join(_set(h, NORM0, "shape", [-64]), d)),
                       "model.safetensors", f"{NORM0}.shape"),
    "shape/offsets mismatch": (SINGLE, edit_weights(lambda h, d: join(_set(h, EMBED, "shape", [600, 6400]), d)),
                               "model.safetensors", f"{EMBED}.data_offsets"),
    "offsets past the end": (SINGLE, edit_weights(lambda h, d: join(h, d[:-1024])),
                             "model.safetensors", ".data_offsets"),
    "overlapping tensors": (SINGLE, edit_weights(
        lambda h, d: join(_set(h, NORM1, "data_offsets", h[NORM0]["data_offsets"]), d)),
        "model.safetensors", f"{NORM1}.data_offsets"),
    "config not JSON": (SINGLE, write("config.json", "{\"hidden_size\": 64,"), "config.json", "JSON"),
    "config a list": (SINGLE, write("config.json", "[1, 2, 3]"), "config.json", "JSON object"),
    "0 heads": (SINGLE, edit_config(lambda c: c.update(num_attention_heads=0)), "config.json", "num_attention_heads"),
    "negative hidden size": (SINGLE, edit_config(lambda c: c.update(hidden_size=-64)), "config.json", "hidden_size"),
    "heads as text": (SINGLE, edit_config(lambda c: c.update(num_attention_heads="4")), "config.json",
                      "num_attention_heads"),
    "10^7 layers": (SINGLE, edit_config(lambda c: c.update(num_hidden_layers=10**7)), "config.json",
                    "num_hidden_layers"),
    "vocab 10^12": (SINGLE, edit_config(lambda c: c.update(vocab_size=10**12)), "config.json", "vocab_size"),
    "vocab larger than the weights": (SINGLE, edit_config(lambda c: c.update(vocab_size=10**6)), "config.json",
                                      "vocab_size"),
    "ffn larger than the weights": (SINGLE, edit_config(lambda c: c.update(intermediate_size=10**6)), "config.json",
                                    "intermediate_size"),
    "10^12 positions": (SINGLE, edit_config(lambda c: c.update(max_position_embeddings=10**12)), "config.json",
                        "max_position_embeddings"),
    "rope_theta a list": (SINGLE, edit_config(lambda c: c.update(rope_theta=[1])), "config.json", "malformed"),
    "tokenizer not JSON": (SINGLE, write("tokenizer.json", "{\"model\": "), "tokenizer.json", "unreadable"),
    "index not JSON": (SHARDED, write("model.safetensors.index.json", "{weight_map"),
                       "model.safetensors.index.json", "JSON"),
    "index weight_map a list": (SHARDED, edit_index(lambda i: {"weight_map": ["a.safetensors"]}),
                                "model.safetensors.index.json", "weight_map"),
    "index name ../x": (SHARDED, edit_index(lambda i: i["weight_map"].update({EMBED: "../x.safetensors"})),
                        "model.safetensors.index.json", "weight_map"),
    "index absolute name": (SHARDED, edit_index(lambda i: i["weight_map"].update({EMBED: "/etc/hostname"})),
                            "model.safetensors.index.json", "weight_map"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_model_directory_is_one_error_naming_file_and_field(tmp_path, kind):
    from ascend_llm.interop.source import open_model

    src, hostile, file, field = KINDS[kind]
    root = copy_model(src, tmp_path / "model")
    hostile(root)
    with pytest.raises(UserInputError) as info:
        open_model(root, build=False)
    line = info.value.one_line()
    assert file in line and field in line, line
    assert "\n" not in line


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/hostname", "a/../../b"])
def test_state_json_file_names_that_leave_the_checkpoint_are_refused(tmp_path, name):
    from ascend_llm.store.checkpoints import read_checkpoint

    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (tmp_path / "run" / "outside.safetensors").write_bytes(b"x")
    (step / "state.json").write_text(json.dumps({"format": 2, "step": 1, "files": {name: "0" * 64},
                                                 "tensor_parts": [], "parts": {}}))
    with pytest.raises(UserInputError) as info:
        read_checkpoint(step)
    assert "state.json" in info.value.one_line() and "files" in info.value.one_line()


def test_library_reader_refuses_a_truncated_file_before_allocating(tmp_path):
    from ascend_llm.interop.safetensors_io import read_header, read_tensors

    header, data = split((SINGLE / "model.safetensors").read_bytes())
    good = tmp_path / "good.safetensors"
    good.write_bytes(join(header, data))
    assert set(read_tensors(good)) == set(header) - {"__metadata__"}
    assert read_header(good)[EMBED]["shape"] == [600, 64]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(join({"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"\0" * 16))
    with pytest.raises(UserInputError, match=r"bad.safetensors:x.data_offsets.*past the end"):
        read_tensors(bad)


# --- through the CLI: exit 2, one line, no traceback, nothing written ----------------------------------------------

CORPUS = "一二三四五六七八九十。春眠不觉晓，处处闻啼鸟。\n" * 20


def run_cli(*argv: str, cwd: Path, process: bool) -> tuple[int, str]:
    """(exit status, stderr) of `ascend-llm ARGV` in `cwd`, as a real process or in-process (main(argv))."""
    if process:
        env = {**os.environ, "GLOG_v": "3"}
        done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
        return done.returncode, done.stderr
    from ascend_llm.cli.main import main

    old, err = Path.cwd(), io.StringIO()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(argv))
    finally:
        os.chdir(old)
    return code, err.getvalue()


CLI_CASES = [("quantize", "10^7 layers", True), ("generate", "header size 2^63", True),
             ("eval", "tokenizer not JSON", True), ("quantize", "vocab 10^12", False),
             ("generate", "index name ../x", False), ("eval", "overlapping tensors", False), ("eval", "0 heads", False)]


@pytest.mark.parametrize("verb,kind,process", [pytest.param(*case, marks=pytest.mark.integration) if case[2]
                                               else case for case in CLI_CASES])
def test_cli_on_a_hostile_model_exits_2_with_one_line(tmp_path, verb, kind, process):
    src, hostile, file, field = KINDS[kind]
    root = copy_model(src, tmp_path / "model")
    hostile(root)
    (tmp_path / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    argv = {"quantize": ["quantize", str(root), "--out", "q", "--bits", "8"],
            "generate": ["generate", str(root), "--prompt", "hi", "--max-new-tokens", "2"],
            "eval": ["eval", str(root), "--corpus", "corpus.txt", "--window", "16"]}[verb]
    code, stderr = run_cli(*argv, cwd=tmp_path, process=process)
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-2000:]
    assert file in lines[0] and field in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "model"]  # nothing written


@pytest.mark.parametrize("field,value", [("num_layers", 10**7), ("vocab_size", 10**9), ("dim", 4096),
                                         ("max_seq_len", 10**12)])
def test_checkpoint_whose_state_json_declares_absurd_sizes_is_refused_before_building(tmp_path, field, value):
    """state.json records the model config but is not itself under a checksum: its sizes are compared with the
    checkpoint's tensors before any model is built (a 10^7-layer model would otherwise be allocated)."""
    import dataclasses

    from ascend_llm.interop.source import open_model
    from ascend_llm.train.checkpoint import save_model_checkpoint

    hf = open_model(SINGLE, build=False)
    step = save_model_checkpoint(tmp_path / "run", 1, hf.weights, {"model": dataclasses.asdict(hf.config)})
    meta = json.loads((step / "state.json").read_text())
    meta["parts"]["run"]["config"]["model"][field] = value
    (step / "state.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError) as info:
        open_model(step)
    assert "state.json" in info.value.one_line() and f"model.{field}" in info.value.one_line()


@pytest.mark.parametrize("field,value", [("num_layers", 10**7), ("vocab_size", 10**9)])
def test_quantized_layout_declaring_absurd_sizes_is_refused_before_building(tmp_path, field, value):
    from ascend_llm.cli.main import main
    from ascend_llm.interop.source import open_model

    assert main(["quantize", str(SINGLE), "--out", str(tmp_path / "q"), "--bits", "8"]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["model"][field] = value
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError) as info:
        open_model(tmp_path / "q", build=False)
    assert "config.json" in info.value.one_line() and f"model.{field}" in info.value.one_line()


@pytest.mark.parametrize("text", ["{\"num_tokens\": ", "[1, 2]"])
def test_a_damaged_prepared_corpus_is_one_line_naming_meta_json(tmp_path, text):
    (tmp_path / "c.txt").write_text(CORPUS, encoding="utf-8")
    argv = ["prepare", "data.path=c.txt", "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}", "--output",
            "out", "--no-progress"]
    assert run_cli(*argv, cwd=tmp_path, process=False)[0] == 0
    (tmp_path / "out" / "meta.json").write_text(text)
    code, stderr = run_cli(*argv, cwd=tmp_path, process=False)
    assert code == 2 and "meta.json" in stderr and len(stderr.strip().splitlines()) == 1, stderr
