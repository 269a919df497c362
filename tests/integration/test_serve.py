"""`ascend-llm serve` as a real process on localhost, driven by a real HTTP client (httpx): health, models,
completions, chat, streaming (server-sent events), concurrent requests, malformed requests, overload (503) and
shutdown on SIGTERM with a request in flight."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ascend_llm.config.model import ModelConfig
from ascend_llm.models.llama import build_model
from ascend_llm.tokenizer.bpe import train_tokenizer
from ascend_llm.train.checkpoint import save_model_checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
WORDS = ["春", "風", "花", "月", "山", "水", "雲", "夜", "江", "柳", "秋", "雨", "人", "歸", "酒", "明"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(WORDS, size=30)) for _ in range(40)]
    (root / "prepared").mkdir()
    train_tokenizer(docs, 300).save(str(root / "prepared" / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=320, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64,
                      max_seq_len=64)
    model = build_model(cfg, seed=2)
    save_model_checkpoint(root / "run", 1, {n: p.asnumpy() for n, p in model.parameters_and_names()},
                          {"model": dataclasses.asdict(cfg)}, tokenizer=root / "prepared" / "tokenizer.json")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ascend_llm.cli.main", "serve", str(root / "run"), "--port",
                             str(port), "--num-slots", "2", "--max-len", "48", "--prefill-bucket", "16",
                             "--max-queue", "3", "--model-name", "tiny", "--grace", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("server did not come up")
    yield base, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def complete(base, prompt, **extra):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=300)


def test_health_models_completion_chat_stream(server):
    base, _ = server
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "tiny"
    first = complete(base, "春風")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] >= 1
    assert complete(base, "春風").json()["choices"][0]["text"] == body["choices"][0]["text"]  # greedy
    chat = httpx.post(f"{base}/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": "山水"}], "max_tokens": 6, "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    pieces, finish = [], None
    with httpx.stream("POST", f"{base}/v1/completions", timeout=300,
                      json={"prompt": "春風", "max_tokens": 8, "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[len("data: "):])["choices"][0]
        pieces.append(choice["text"])
        finish = choice["finish_reason"] or finish
    assert "".join(pieces) == body["choices"][0]["text"] and finish == body["choices"][0]["finish_reason"]


def test_concurrent_requests_match_sequential(server):
    base, _ = server
    prompts = ["春", "山水雲", "夜江柳秋雨", "人歸"]
    sequential = [complete(base, p, max_tokens=10).json()["choices"][0]["text"] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: complete(base, p, max_tokens=10), prompts))
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["choices"][0]["text"] for a in answers] == sequential


@pytest.mark.parametrize("body,param", [({"max_tokens": 4}, "prompt"), ({"prompt": "春", "max_tokens": 0},
                                        "max_tokens"), ({"prompt": "春", "temperature": -1}, "temperature"),
                                        ({"prompt": "春" * 60}, "prompt"), ({"prompt": "春", "n": 2}, "n")])
def test_malformed_requests_get_400_naming_the_field(server, body, param):
    base, _ = server
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    bad_json = httpx.post(f"{base}/v1/completions", content=b"{not json", timeout=60,
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()


def test_overload_gets_503(server):
    base, _ = server
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: complete(base, "春" * (i + 1), max_tokens=30), range(12)))
    codes = [a.status_code for a in answers]
    assert 503 in codes and set(codes) <= {200, 503}
    assert all(a.json()["error"]["type"] == "overloaded" for a in answers if a.status_code == 503)


def test_sigterm_finishes_in_flight_request_and_exits(server):
    base, proc = server
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(complete, base, "春風", max_tokens=30)
        deadline = time.time() + 60
        while httpx.get(f"{base}/health").json()["running"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        answer = pending.result(timeout=120)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/health", timeout=2)
