"""`ascend-llm bench serve MODEL`: throughput and latency of sequential, static and continuous batching, for the
model in float32 and with int8 / int4 weights (RTN, quantized in-process).

Workload: `--num-requests` requests (default 64), all arriving at t = 0, with prompt and output lengths drawn
uniformly from [--min-len, --max-prompt] and [--min-len, --max-new] (seeded; random token ids, greedy, no stop
token, so every request generates exactly its output length). Modes:
  sequential  one request at a time (Engine with 1 slot)
  static      batches of --num-slots requests in arrival order; a batch runs until its longest request ends
  continuous  ContinuousBatcher with --num-slots slots: requests join and leave at every decode step
Latency of a request = time from t = 0 to its last token. Throughput = generated tokens / wall time. Every
compiled shape is warmed up before timing (compile time is excluded). Numbers on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ascend_llm.bench.report import print_table, write_json

COLUMNS = ["weights", "mode", "requests", "tokens", "wall_s", "tokens_per_s", "p50_latency_s", "p95_latency_s",
           "speedup_vs_sequential"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ascend-llm bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run/checkpoint or Hugging Face directory (float weights)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--num-slots", type=int, default=8)
    p.add_argument("--min-len", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--prefill-bucket", type=int, default=32)
    p.add_argument("--weights", default="fp32,int8,int4", help="comma list of fp32, int8, int4")
    p.add_argument("--modes", default="sequential,static,continuous")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_serve.json")
    return p


def workload(args, vocab: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(args.seed)
    return [(list(rng.integers(1, vocab, size=int(rng.integers(args.min_len, args.max_prompt + 1)))),
             int(rng.integers(args.min_len, args.max_new + 1))) for _ in range(args.num_requests)]


def _params(n: int):
    from ascend_llm.inference.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n)


def _execute(mode: str, engine, batcher, requests, slots: int) -> tuple[float, list[float], int]:
    from ascend_llm.inference.batching import Request

    latencies, tokens = [], 0
    start = time.perf_counter()
    if mode == "continuous":
        done = [batcher.submit(Request(p, _params(n))) for p, n in requests]
        batcher.run_until_idle()
        latencies = [r.finish_s - start for r in done]
        tokens = sum(len(r.out) for r in done)
    else:
        for i in range(0, len(requests), slots):
            batch = requests[i:i + slots]
            results = engine.generate([p for p, _ in batch], [_params(n) for _, n in batch])
            latencies += [time.perf_counter() - start] * len(batch)
            tokens += sum(len(r.token_ids) for r in results)
    return time.perf_counter() - start, latencies, tokens


def run_mode(mode: str, model, requests, args, max_len: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, generated tokens). Warm-up: the same workload with outputs cut to
    2 tokens, untimed, so every prefill/decode shape is compiled (and MindSpore's shape handling has settled)."""
    from ascend_llm.inference.batching import ContinuousBatcher
    from ascend_llm.inference.engine import Engine

    slots = 1 if mode == "sequential" else args.num_slots
    engine = Engine(model, max_len, slots, args.prefill_bucket)
    batcher = ContinuousBatcher(engine, max_queue=len(requests)) if mode == "continuous" else None
    _execute(mode, engine, batcher, [(p, 2) for p, _ in requests], slots)
    return _execute(mode, engine, batcher, requests, slots)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import mindspore as ms

    from ascend_llm.config.quant import QuantConfig
    from ascend_llm.eval.source import load_source
    from ascend_llm.quant.apply import apply_quantization

    ms.set_context(mode=ms.GRAPH_MODE)
    max_len = args.max_prompt + args.max_new
    rows = []
    for weights in args.weights.split(","):
        source = load_source(args.model)
        if max_len > source.model_cfg.max_seq_len:
            from ascend_llm.errors import ConfigError

            raise ConfigError("--max-prompt + --max-new", max_len,
                              f"must be <= the model's max_seq_len={source.model_cfg.max_seq_len}")
        if weights != "fp32":
            bits = {"int8": 8, "int4": 4}[weights]
            apply_quantization(source.model, QuantConfig(bits=bits, group_size=-1 if bits == 8 else 128))
        requests = workload(args, source.model_cfg.vocab_size)
        base = None
        for mode in args.modes.split(","):
            wall, lat, tokens = run_mode(mode, source.model, requests, args, max_len)
            rate = tokens / wall
            base = base or (rate if mode == "sequential" else None)
            rows.append({"weights": weights, "mode": mode, "requests": len(requests), "tokens": tokens,
                         "wall_s": round(wall, 2), "tokens_per_s": round(rate, 1),
                         "p50_latency_s": round(float(np.percentile(lat, 50)), 2),
                         "p95_latency_s": round(float(np.percentile(lat, 95)), 2),
                         "speedup_vs_sequential": round(rate / base, 2) if base else ""})
            print(f"{weights} {mode}: {rate:.1f} tokens/s", flush=True)
    print_table(rows, COLUMNS)
    write_json(args.json, "serve", rows, num_slots=args.num_slots, model=args.model)
    return 0
