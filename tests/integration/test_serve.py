"""`ascend-llm serve` of a toolkit run as a real process on localhost, driven by real clients (httpx, raw sockets,
the openai SDK): API key, health and Prometheus metrics, limits, a poisonous request beside good ones, client
disconnects freeing KV blocks, overload, and SIGTERM with streams and waiting clients open (one server, in order).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ascend_llm.cli.serve import parser
from ascend_llm.config.model import ModelConfig
from ascend_llm.models.llama import build_model
from ascend_llm.tokenizer.bpe import train_tokenizer
from ascend_llm.train.checkpoint import save_model_checkpoint
from tests.integration.openai_server import start_server

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]  # one xdist worker: fixtures start once
WORDS = ["春", "風", "花", "月", "山", "水", "雲", "夜", "江", "柳", "秋", "雨", "人", "歸", "酒", "明"]
KEY = "test-key-7"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRACE_S = 2.0
LONG = 200  # max_tokens of a request that runs to its end
ABANDONED = 2000  # max_tokens of the requests a client abandons: the client closes within ~0.5 s of generation even
# on a loaded machine, where 200 tokens of this model may take 0.2 s
CONTEXT = 4096  # long enough that the requests open at SIGTERM cannot finish within --grace


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(WORDS, size=30)) for _ in range(40)]
    (root / "prepared").mkdir()
    train_tokenizer(docs, 300).save(str(root / "prepared" / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=320, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64,
                      max_seq_len=CONTEXT)
    model = build_model(cfg, seed=2)
    save_model_checkpoint(root / "run", 1, {n: p.asnumpy() for n, p in model.parameters_and_names()},
                          {"model": dataclasses.asdict(cfg)}, tokenizer=root / "prepared" / "tokenizer.json")
    server = start_server(root / "run", "--max-num-seqs", "2", "--max-queue", "3", "--model-name", "tiny",
                          "--grace", str(GRACE_S), "--max-body-bytes", "4000000", "--max-stop", "4", "--max-n", "2",
                          "--max-prompt-tokens", "128", "--max-prefill-chunk", "32",  # 3 step graphs to compile
                          log_dir=root, env={"ASCEND_LLM_API_KEY": KEY})
    yield server
    server.stop(signal.SIGKILL)


def post(server, body, path="/v1/completions", **kw):
    return httpx.post(server.base + path, json={"model": "tiny", "temperature": 0, **body}, headers=AUTH,
                      timeout=300, **kw)


def text_of(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def metrics(server) -> dict:
    text = httpx.get(server.base + "/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_api_key_health_and_metrics(server):
    assert parser().parse_args(["m"]).host == "127.0.0.1"
    health = httpx.get(server.base + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["kv_blocks_used"] == 0 and health["kv_blocks_free"] > 0
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        denied = httpx.get(server.base + "/v1/models", headers=headers, timeout=30)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
    out = client.completions.create(model="tiny", prompt="春風", max_tokens=6, temperature=0)
    assert out.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="nope", max_retries=0).models.list()
    seen = metrics(server)
    for name in ("num_requests_running", "num_requests_waiting", "num_kv_blocks_used", "num_kv_blocks_free",
                 "kv_cache_usage_perc", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count"):
        assert f"ascend_llm:{name}" in seen, name
    assert seen["ascend_llm:generation_tokens_total"] >= out.usage.completion_tokens
    assert seen["ascend_llm:time_to_first_token_seconds_count"] >= 1


def test_chat_without_a_template_is_refused(server):
    answer = post(server, {"messages": [{"role": "user", "content": "春"}]}, "/v1/chat/completions")
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "messages"


def test_limits(server):
    too_big = httpx.post(server.base + "/v1/completions", content=b"{" + b" " * 4_000_001 + b"}", headers=AUTH,
                         timeout=60)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "body"
    cases = [({"prompt": "春" * 300}, "prompt"), ({"prompt": "春", "stop": ["a"] * 5}, "stop"),
             ({"prompt": "春", "stop": "x" * 300}, "stop"), ({"prompt": "春", "n": 3}, "n"),
             ({"prompt": ["春"] * 2, "n": 2}, "n"), ({"prompt": "春", "max_tokens": CONTEXT}, "max_tokens"),
             ({"prompt": [1, 2, 999]}, "prompt")]
    for body, param in cases:
        answer = post(server, body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (body, answer.text)
    bad_json = httpx.post(server.base + "/v1/completions", content=b"{not json", headers=AUTH, timeout=60)
    assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    unknown = httpx.get(server.base + "/v1/nothing", headers=AUTH, timeout=60)
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_big_prompt_tokenizes_off_the_event_loop(server):
    """A prompt near the body limit is tokenized on the pool: /health keeps answering while that request is in
    flight (unless the request is over too soon to have blocked anything). The old server tokenized on the event
    loop and stalled every endpoint for the whole tokenization."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client:
        began = time.perf_counter()
        big = pool.submit(post, server, {"prompt": "春風花月" * 300_000})
        answered_during = 0
        while not big.done():  # one connection for the polls: a fresh client per poll was ~50 ms under load
            status = client.get(server.base + "/health").status_code
            answered_during += status == 200 and not big.done()
            time.sleep(0.01)
        took = time.perf_counter() - began
        answer = big.result()
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
    assert answered_during >= 1 or took < 0.3, (answered_during, took)


POISON = [({"seed": -1}, "seed"), ({"temperature": 1e-310}, "temperature"),
          ({"repetition_penalty": 1e-320}, "repetition_penalty"), ({"top_p": 0}, "top_p"),
          ({"logprobs": 99}, "logprobs"), ({"stop": ["x"] * 10}, "stop")]


def test_poisonous_requests_never_fail_their_neighbours(server):
    _wait_idle(server)  # 4 good requests fit 2 slots + a queue of 3 only when no earlier test's request is left
    prompts = ["春", "山水雲", "夜江柳秋雨", "人歸"]
    alone = [text_of(post(server, {"prompt": p, "max_tokens": 10})) for p in prompts]
    nan = json.dumps({"model": "tiny", "prompt": "春", "temperature": float("nan")}).encode()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        good = [pool.submit(post, server, {"prompt": p, "max_tokens": 10}) for p in prompts]
        bad = [pool.submit(post, server, {"prompt": "春風", "max_tokens": 10, **body}) for body, _ in POISON]
        raw_nan = pool.submit(httpx.post, server.base + "/v1/completions", content=nan, timeout=300,
                              headers={**AUTH, "content-type": "application/json"})
        answers = [g.result() for g in good]
    assert [text_of(a) for a in answers] == alone
    for future, (_, param) in zip(bad, POISON):
        assert future.result().status_code == 400 and future.result().json()["error"]["param"] == param
    assert raw_nan.result().status_code == 400 and raw_nan.result().json()["error"]["param"] == "temperature"


def _raw_request(server, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.base.rsplit(":", 1)[1])))
    data = json.dumps({"model": "tiny", "temperature": 0, **body}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
                 + AUTH["Authorization"].encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def _wait_idle(server, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        health = httpx.get(server.base + "/health", timeout=30).json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.02)
    raise AssertionError(f"requests still running: {health}")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_and_frees_blocks(server, stream):
    full = post(server, {"prompt": "春風", "max_tokens": LONG, "ignore_eos": True}).json()  # not abandoned
    assert full["usage"]["completion_tokens"] == LONG
    before = metrics(server)["ascend_llm:generation_tokens_total"]
    sock = _raw_request(server, {"prompt": "春風", "max_tokens": ABANDONED, "stream": stream, "ignore_eos": True})
    deadline = time.monotonic() + 120
    if stream:
        got = b""
        sock.settimeout(120)
        while got.count(b"data: ") < 3:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the stream before 3 chunks: {got[-500:]!r}"
            got += chunk
    else:
        # one connection for the polls (~1 ms each, a fresh client per poll was ~50 ms under load: the 200 tokens
        # could finish between two polls and the loop never ended)
        with httpx.Client(timeout=30) as client:
            while client.get(server.base + "/health").json()["kv_blocks_used"] == 0:
                answered = select.select([sock], [], [], 0)[0]
                assert not answered, f"answered before it got a KV block: {sock.recv(4096)[:500]!r}"
                assert time.monotonic() < deadline, "the request to abandon never got a KV block"
                time.sleep(0.002)
    sock.close()
    health = _wait_idle(server)
    generated = metrics(server)["ascend_llm:generation_tokens_total"] - before
    assert health["kv_blocks_used"] == 0 and generated < ABANDONED / 4, generated


def test_overload_gets_503_in_openai_shape(server):
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda i: post(server, {"prompt": "春" * (i + 1), "max_tokens": 30}), range(10)))
    codes = [a.status_code for a in answers]
    assert 503 in codes and set(codes) <= {200, 503}
    assert all(a.json()["error"]["code"] == "overloaded" for a in answers if a.status_code == 503)


def test_no_graph_compile_after_start(server):
    """Every step graph is compiled before /health answers: after the requests of the tests above and a mix of
    prompt lengths in flight together, ascend_llm:graph_compiles_total is still the start-up count."""
    started = int(re.search(r"compiled (\d+) step shapes", server.output()).group(1))
    prompts = [[int(t) for t in np.random.default_rng(n).integers(0, 300, n)] for n in (1, 7, 40, 127, 3, 90)]
    # 5 clients = --max-num-seqs 2 + --max-queue 3: never a 503, however answers and new requests interleave with
    # steps (two requests finishing in one step and their clients' next requests arriving before the next step)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda p: post(server, {"prompt": p, "max_tokens": 5}), prompts))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert started > 0 and metrics(server)["ascend_llm:graph_compiles_total"] == started


def test_sigterm_ends_streams_with_error_and_done_then_exits(server):
    """Last: past --grace, an open stream gets an error chunk and [DONE], a waiting client a 503 JSON error;
    the process exits 0 within --grace plus a few seconds."""
    def stream():
        with httpx.stream("POST", server.base + "/v1/completions", headers=AUTH, timeout=300, json={
                "model": "tiny", "prompt": "春風", "max_tokens": CONTEXT - 8, "stream": True,
                "ignore_eos": True}) as response:
            return [line for line in response.iter_lines() if line]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream)
        waiting = pool.submit(post, server, {"prompt": "山水", "max_tokens": CONTEXT - 8, "ignore_eos": True})
        while httpx.get(server.base + "/health", timeout=30).json()["running"] < 2:
            time.sleep(0.01)
        sent = time.time()
        server.proc.send_signal(signal.SIGTERM)
        answer, events = waiting.result(timeout=120), streamed.result(timeout=120)
    assert events[-1] == "data: [DONE]", events[-3:]
    assert json.loads(events[-2][6:])["error"]["code"] == "shutting_down", events[-3:]
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down", answer.text
    assert server.proc.wait(timeout=GRACE_S + 30) == 0
    exit_s = time.time() - sent
    print(f"exit {exit_s:.1f} s after SIGTERM (grace {GRACE_S} s)")
    assert "春風" not in server.output() and "山水" not in server.output()  # no prompt logging


def test_max_queue_below_zero_is_refused_before_the_model_opens(tmp_path):
    """--max-queue 0 is allowed (no request waits for a busy slot); -1 is one line naming the flag, exit 2."""
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "serve", str(tmp_path / "none"),
                           "--max-queue", "-1"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.strip()) == (2, "config error: --max-queue=-1: must be >= 0"), done.stderr
    assert parser().parse_args(["m", "--max-queue", "0"]).max_queue == 0
