"""A real `ascend-llm serve` process on 127.0.0.1 (free port) for the server tests, and the model directories they
serve: the shared HF fixtures, a Llama-3-style variant of llama_gqa, and `ascend-llm quantize` copies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "hf"
START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    base: str  # http://127.0.0.1:PORT
    log: Path

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: Path, *args: str, log_dir: Path, env: dict | None = None) -> Server:
    """`python -m ascend_llm.cli.main serve MODEL --port P ARGS`; returns once GET /health answers 200."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    environment = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3", **(env or {}))
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ascend_llm.cli.main", "serve", str(model), "--port",
                                 str(port), *args], env=environment, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {server.output()[-3000:]}")
        try:
            if httpx.get(f"{server.base}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not come up in {START_TIMEOUT_S} s: {server.output()[-3000:]}")


def golden(name: str) -> dict:
    data = json.loads((FIXTURES / f"{name}.golden.json").read_text())
    for key in ("text_input_ids", "greedy_continuation_ids", "chat_input_ids"):
        if isinstance(data.get(key), str):
            data[key] = json.loads(data[key])
    return data


START_HEADER, END_OF_TEXT, EOT = 637, 636, 639  # llama_gqa's <|start_header_id|>, <|end_of_text|>, <|eot_id|>


def make_llama3_style(out: Path) -> Path:
    """llama_gqa as Meta-Llama-3-Instruct ships: generation_config.json eos_token_id = [<|end_of_text|>,
    <|eot_id|>] while tokenizer_config.json keeps eos_token <|end_of_text|>. Two lm_head rows are set (NumPy only)
    from the transformers golden greedy continuation b0, b1 of the golden prompt P:
      row <|start_header_id|> = 2 x row b0: after P, greedy emits <|start_header_id|> (special, not an EOS);
      row <|eot_id|> = 2 x row b1: after P + [b0] (token ids), greedy emits <|eot_id|> (an EOS only in
      generation_config.json) at once.
    The chat template, tokenizer and other weights are untouched (the golden chat ids still hold)."""
    from ascend_llm.interop.safetensors_io import read_tensors, write_tensors

    shutil.copytree(FIXTURES / "llama_gqa", out, copy_function=shutil.copyfile)
    out.chmod(0o755)  # the shared fixtures are read-only
    b0, b1 = golden("llama_gqa")["greedy_continuation_ids"][:2]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = out / index["lm_head.weight"]
    tensors = read_tensors(shard)
    head = tensors["lm_head.weight"]
    head[START_HEADER], head[EOT] = 2 * head[b0], 2 * head[b1]
    write_tensors(shard, tensors, "F32", {"format": "pt"})
    generation = json.loads((out / "generation_config.json").read_text())
    generation["eos_token_id"] = [END_OF_TEXT, EOT]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def quantize(model: Path, out: Path, bits: int = 8) -> Path:
    """`ascend-llm quantize MODEL --out OUT --bits BITS` (RTN), run in this process."""
    from ascend_llm.cli.quantize import main

    assert main([str(model), "--out", str(out), "--bits", str(bits)]) == 0
    return out
