"""`ascend-llm bench serve MODEL`: throughput and latency of `ascend-llm serve` as clients see it (vLLM's
benchmark_serving): the same workload sent one request at a time (sequential) and with --concurrency requests in
flight (continuous batching), through the OpenAI API over HTTP on 127.0.0.1.

Workload: --num-requests (64) requests with prompt lengths uniform in [--min-prompt, --max-prompt] random token ids
and output lengths uniform in [--min-new, --max-new] (seeded), greedy, `ignore_eos` (vLLM's extra) so every request
generates exactly its output length. Each request streams (the server sends a chunk for every new token, even while
its text is held back, as vLLM does): time to first token (TTFT) = first chunk; per-token latency (TPOT) = (last
chunk - first) / (tokens - 1). Throughput = generated tokens / wall time of the whole workload; with --repeats N
the two modes alternate N times and each continuous run's speedup is over the sequential run just before it (a
drifting shared machine moves both). The server is started here (`--max-num-seqs` = --concurrency) unless --url
names a running one; the server compiles every step graph before it answers /health (start-up time is reported),
and graph_compiles is the rise of the server's ascend_llm:graph_compiles_total during each timed run (0: no
request waited for a compile). A few short requests of each mode run untimed first. Numbers on a shared
CPU are noisy: run it on a quiet machine (the `load` column is the 1-minute load average before-after each run).
The server's fused CPU layer uses $ASCEND_LLM_KERNEL_THREADS threads (default min(2, CPUs); inference/cpu_pool.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ascend_llm.bench.report import print_table, write_json

COLUMNS = ["repeat", "mode", "concurrency", "requests", "tokens", "wall_s", "tokens_per_s", "speedup", "ttft_p50_s",
           "ttft_p95_s", "tpot_p50_ms", "tpot_p95_ms", "graph_compiles", "load"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory to serve (its vocabulary sizes the random prompts)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per mode (default 64)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight, continuous mode (default 16)")
    p.add_argument("--min-prompt", type=int, default=16, help="shortest prompt in tokens (default 16)")
    p.add_argument("--max-prompt", type=int, default=256, help="longest prompt in tokens (default 256)")
    p.add_argument("--min-new", type=int, default=16, help="shortest output in tokens (default 16)")
    p.add_argument("--max-new", type=int, default=128, help="longest output in tokens (default 128)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--repeats", type=int, default=1, help="sequential-then-continuous pairs to run; each continuous "
                                                          "row's speedup is over the sequential run just before it "
                                                          "(default 1)")
    p.add_argument("--url", help="benchmark this running server (http://HOST:PORT) instead of starting one")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `ascend-llm serve` "
                                                                    "(repeatable, e.g. --serve-arg=--pynative)")
    p.add_argument("--json", default="bench_serve.json", help="output JSON (default bench_serve.json)")
    return p


def workload(args, vocab_size: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(args.seed)
    return [([int(t) for t in rng.integers(0, vocab_size, int(rng.integers(args.min_prompt, args.max_prompt + 1)))],
             int(rng.integers(args.min_new, args.max_new + 1))) for _ in range(args.num_requests)]


async def one(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: {ttft_s, tpot_s, tokens}."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, last, tokens = time.perf_counter(), None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                now = time.perf_counter()
                first, last = first or now, now
    first, last = first or time.perf_counter(), last or time.perf_counter()
    return {"ttft_s": first - start, "tpot_s": (last - first) / max(tokens - 1, 1), "tokens": tokens}


async def run(base: str, model: str, requests: list, concurrency: int) -> tuple[float, list[dict]]:
    """Send every request with at most `concurrency` in flight; (wall seconds, per-request results)."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=3600, limits=limits) as client:
        async def guarded(prompt, n):
            async with gate:
                return await one(client, model, prompt, n)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(p, n) for p, n in requests))
        return time.perf_counter() - start, list(results)


def summarize(mode: str, concurrency: int, wall: float, results: list[dict], base_rate: float | None) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] for r in results]
    tpot = [r["tpot_s"] * 1e3 for r in results]
    rate = tokens / wall

    def pct(values: list[float], q: int, digits: int) -> float:
        return round(float(np.percentile(values, q)), digits)

    return {"mode": mode, "concurrency": concurrency, "requests": len(results), "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(rate, 1),
            "speedup": round(rate / base_rate, 2) if base_rate else 1.0,
            "ttft_p50_s": pct(ttft, 50, 3), "ttft_p95_s": pct(ttft, 95, 3),
            "tpot_p50_ms": pct(tpot, 50, 1), "tpot_p95_ms": pct(tpot, 95, 1)}


def _check(args, context: int) -> None:
    from ascend_llm.errors import ConfigError

    for name in ("num_requests", "concurrency", "min_prompt", "min_new", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "must be >= 1")
    if args.max_prompt < args.min_prompt or args.max_new < args.min_new:
        raise ConfigError("--max-prompt/--max-new", (args.max_prompt, args.max_new), "must be >= the minimum")
    if args.max_prompt + args.max_new > context:
        raise ConfigError("--max-prompt + --max-new", args.max_prompt + args.max_new,
                          f"must fit the model's context of {context} tokens")


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from ascend_llm.interop.source import open_model

    source = open_model(args.model, build=False)
    _check(args, source.config.max_seq_len)
    requests = workload(args, source.config.vocab_size)
    began = time.perf_counter()
    server = None if args.url else _start_server(args)
    startup_s = None if args.url else round(time.perf_counter() - began, 1)
    if startup_s is not None:
        print(f"server ready in {startup_s} s (model load and step-graph compiles)", flush=True)
    base = args.url or server[1]
    try:
        model = _model_id(base)
        # warm-up, untimed: the server compiled its step graphs before answering /health; a few requests of each
        # mode warm the HTTP path (connections, threads, allocator)
        for concurrency in (1, args.concurrency):
            asyncio.run(run(base, model, [(p, min(n, 4)) for p, n in requests[:concurrency]], concurrency))
        rows = []
        for repeat in range(args.repeats):
            for mode, concurrency in (("sequential", 1), ("continuous", args.concurrency)):
                before, load_before = _graph_compiles(base), _load()
                wall, results = asyncio.run(run(base, model, requests, concurrency))
                base_rate = rows[-1]["tokens_per_s"] if mode == "continuous" else None
                rows.append({**summarize(mode, concurrency, wall, results, base_rate), "repeat": repeat + 1})
                compiles = _graph_compiles(base)
                rows[-1]["graph_compiles"] = None if compiles is None else compiles - (before or 0)
                rows[-1]["load"] = f"{load_before}-{_load()}"
                print(f"{mode}: {rows[-1]['tokens_per_s']} tokens/s", flush=True)
    finally:
        if server is not None:
            _stop_server(server[0])
    print_table(rows, COLUMNS)
    speedups = [r["speedup"] for r in rows if r["mode"] == "continuous"]
    if len(speedups) > 1:
        print(f"speedup over {len(speedups)} paired repeats: median {statistics.median(speedups):.2f}x "
              f"(min {min(speedups):.2f}x, max {max(speedups):.2f}x)")
    write_json(args.json, "serve", rows, model=str(Path(args.model).resolve()), num_requests=args.num_requests,
               concurrency=args.concurrency, prompt_len=[args.min_prompt, args.max_prompt],
               new_tokens=[args.min_new, args.max_new], url=args.url, startup_s=startup_s)
    return 0


def _load() -> str:
    """The machine's 1-minute load average ("?" where the OS does not report it)."""
    import os

    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "?"


def _graph_compiles(base: str) -> int | None:
    """The server's ascend_llm:graph_compiles_total (None when /metrics does not report it)."""
    import httpx

    for line in httpx.get(f"{base}/metrics", timeout=60).text.splitlines():
        if line.startswith("ascend_llm:graph_compiles_total "):
            return int(float(line.split()[1]))
    return None


def _model_id(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/v1/models", timeout=60).json()["data"][0]["id"]


def _start_server(args):
    """`ascend-llm serve MODEL` on a free 127.0.0.1 port; (process, base url) once /health answers."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ascend_llm.cli.main", "serve", args.model, "--port", str(port), "--max-num-seqs",
           str(args.concurrency), "--max-queue", str(args.num_requests + 8),
           "--max-model-len", str(args.max_prompt + args.max_new), *args.serve_arg]
    proc = subprocess.Popen(cmd, env=dict(os.environ, GLOG_v="3"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ascend-llm serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    _stop_server(proc)
    raise RuntimeError("ascend-llm serve did not come up within 600 s")


def _stop_server(proc) -> None:
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
