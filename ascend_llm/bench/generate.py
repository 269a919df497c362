"""Decode throughput of the paged-KV-cache engine and scheduler against transformers `generate`, same sitting.

  ascend-llm bench generate MODEL_DIR [--new-tokens 128] [--batch 1 8] [--max-len 256 4096]
                            [--modes graph pynative] [--pynative-new-tokens 16] [--repeats 3]
                            [--peer ../shared/peers/hf_generate.py] [--peer-python PY] [--threads N]
                            [--peer-threads N]
                            [--out bench_results/generate.json]

MODEL_DIR is a Hugging Face directory (`hf_generate.py --make DIR` writes the issue's ~24 M Qwen2). Every row
generates --new-tokens tokens greedily in fp32 for `batch` copies of the peer's prompt, with no stop token (as the
peer does), through `Scheduler.generate` (prefill included, compilation excluded: one warm-up run per engine). Our
runs and the peer's alternate --repeats times (per batch: our engines back to back, then the peer); each figure is
the median, and each ratio the median of per-repeat ratios, so a machine whose speed drifts moves both sides.
tokens/s = batch * new / wall seconds of the whole generate call (the peer's definition); decode_tok_s counts only
the engine's decode steps. kv_blocks_peak is the most KV blocks in use during the run (memory =
blocks in use, kv_mib_peak), kv_mib_pool the pool the engine reserved. vs_peer = ours / transformers at the same
batch (graph rows); the closing lines give max_len ratios and graph / pynative decode tokens/s (pynative rows
generate --pynative-new-tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ascend_llm.bench.report import print_table, write_json

PROMPT = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"  # the peer's default prompt
DEFAULT_PEER = Path(__file__).resolve().parents[3] / "shared" / "peers" / "hf_generate.py"


def timed_run(engine, prompt: list[int], batch: int, new_tokens: int) -> dict:
    """One generate call of `batch` copies through a fresh Scheduler: wall time, decode time, peak blocks."""
    from ascend_llm.inference import Request, SamplingParams, Scheduler

    scheduler = Scheduler(engine, max_queue=batch)
    engine.stats.update(decode_s=0.0, decode_tokens=0)
    began = time.perf_counter()
    requests = [scheduler.submit(Request(list(prompt), SamplingParams(max_new_tokens=new_tokens)))
                for _ in range(batch)]
    peak = 0
    while not scheduler.idle():
        scheduler.step()
        peak = max(peak, engine.allocator.num_used())
    wall = time.perf_counter() - began
    assert all(len(r.out) == new_tokens for r in requests), "every row generates exactly --new-tokens"
    return {"wall_s": wall, "decode_tok_s": engine.tokens_per_second()["decode_tokens_per_s"], "peak": peak}


def run_peer(args, batches: list[int]) -> dict[int, float]:
    """transformers tokens/s per batch from the peer's `transformers batch B: ... = T tok/s` lines."""
    cmd = [args.peer_python, args.peer, args.model, "--new", str(args.new_tokens), "--batch", *map(str, batches),
           "--prompt", PROMPT, "--threads", str(args.peer_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"peer failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("transformers batch "):
            found[int(line.split()[2].rstrip(":"))] = float(line.rsplit("=", 1)[1].split()[0])
    return found


def _engines(model, prompt, args) -> dict:
    import mindspore as ms

    from ascend_llm.inference import Engine

    engines = {}
    for mode in args.modes:
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        lengths = args.max_len if mode == "graph" else args.max_len[:1]
        for max_len in lengths:
            for batch in args.batch:
                engine = Engine(model, max_len=max_len, num_slots=batch)
                timed_run(engine, prompt, batch, _new_tokens(args, mode))  # warm-up: compiles every shape of the run
                engines[(mode, max_len, batch)] = engine
    return engines


def _new_tokens(args, mode: str) -> int:
    return args.new_tokens if mode == "graph" else min(args.new_tokens, args.pynative_new_tokens)


def _paired(a: list[float], b: list[float]) -> float | None:
    """Median of the per-repeat ratios a[i] / b[i] (pairing keeps a ratio meaningful when the machine drifts)."""
    ratios = [x / y for x, y in zip(a, b) if y]
    return round(statistics.median(ratios), 2) if ratios else None


def measure(args) -> tuple[list[dict], list[str]]:
    """Rows (medians over repeats) and the paired ratios: ours / peer, longest / shortest max_len, graph /
    pynative. Each repeat runs, per batch, our engines back to back and then the peer, then the pynative rows."""
    import mindspore as ms

    from ascend_llm.interop.source import open_model

    source = open_model(args.model)
    prompt = source.tokenizer.encode(PROMPT)
    engines = _engines(source.model, prompt, args)
    runs: dict = {key: [] for key in engines}
    peer_runs: dict[int, list[float]] = {b: [] for b in args.batch}
    order = sorted(engines, key=lambda k: (k[0] != "graph", k[2], k[1]))  # per batch: max_lens adjacent
    for _ in range(args.repeats):
        for position, (mode, max_len, batch) in enumerate(order):
            ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
            runs[(mode, max_len, batch)].append(timed_run(engines[(mode, max_len, batch)], prompt, batch,
                                                          _new_tokens(args, mode)))
            last_of_batch = position + 1 == len(order) or order[position + 1][2] != batch
            if args.peer and mode == "graph" and last_of_batch:
                peer_runs[batch] += run_peer(args, [batch]).values()
    tok = {k: [batch * _new_tokens(args, k[0]) / r["wall_s"] for r in v] for k, v in runs.items() for batch in [k[2]]}
    decode = {k: [r["decode_tok_s"] for r in v] for k, v in runs.items()}
    rows = []
    for (mode, max_len, batch) in order:
        engine, results = engines[(mode, max_len, batch)], runs[(mode, max_len, batch)]
        peak = max(r["peak"] for r in results)
        rows.append({"engine": f"ascend_llm {mode}", "batch": batch, "max_len": max_len, "prompt": len(prompt),
                     "new_tokens": _new_tokens(args, mode),
                     "tok_s": round(statistics.median(tok[(mode, max_len, batch)]), 1),
                     "decode_tok_s": round(statistics.median(decode[(mode, max_len, batch)]), 1),
                     "vs_peer": _paired(tok[(mode, max_len, batch)], peer_runs[batch]) if mode == "graph" else None,
                     "kv_blocks_peak": peak, "kv_mib_peak": round(engine.cache_bytes(peak) / 2**20, 1),
                     "kv_mib_pool": round(engine.cache_bytes(engine.num_blocks - 1) / 2**20, 1)})
    for batch, values in peer_runs.items():
        if values:
            rows.append({"engine": "transformers eager", "batch": batch, "prompt": len(prompt),
                         "new_tokens": args.new_tokens, "tok_s": round(statistics.median(values), 1)})
    return rows, _notes(tok, decode, args)


def _notes(tok: dict, decode: dict, args) -> list[str]:
    lines = []
    low, high = min(args.max_len), max(args.max_len)
    for batch in args.batch:
        if low != high and ("graph", high, batch) in tok:
            ratio = _paired(tok[("graph", high, batch)], tok[("graph", low, batch)])
            lines.append(f"batch {batch}: max_len {high} / {low} = {ratio}x tokens/s (paired per repeat)")
        if ("pynative", low, batch) in decode:
            ratio = _paired(decode[("graph", low, batch)], decode[("pynative", low, batch)])
            lines.append(f"batch {batch}, max_len {low}: graph / pynative = {ratio}x decode tokens/s")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm bench generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hugging Face directory (e.g. written by hf_generate.py --make DIR)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-len", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--modes", nargs="+", choices=["graph", "pynative"], default=["graph", "pynative"])
    parser.add_argument("--pynative-new-tokens", type=int, default=16,
                        help="new tokens of the pynative rows (op-by-op decode is slow; compared on decode tokens/s)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of ours and the peer (median)")
    parser.add_argument("--peer", default=str(DEFAULT_PEER) if DEFAULT_PEER.is_file() else None,
                        help="transformers peer script (default ../shared/peers/hf_generate.py when present)")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer")
    parser.add_argument("--peer-python", default=os.environ.get("ASCEND_LLM_PEER_PYTHON", sys.executable),
                        help="a Python with torch and transformers ($ASCEND_LLM_PEER_PYTHON when set)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="our CPU kernel threads")
    parser.add_argument("--peer-threads", type=int, default=2,
                        help="torch threads of the peer (its default 2; on a busy machine 1 is far faster for it)")
    parser.add_argument("--out", default="bench_results/generate.json")
    args = parser.parse_args(argv)
    if args.no_peer:
        args.peer = None
    from ascend_llm.train.runtime import set_cpu_threads

    set_cpu_threads(args.threads)
    rows, notes = measure(args)
    print_table(rows, ["engine", "batch", "max_len", "prompt", "new_tokens", "tok_s", "decode_tok_s", "vs_peer",
                       "kv_blocks_peak", "kv_mib_peak", "kv_mib_pool"])
    print("\n".join(notes))
    path = write_json(args.out, "generate", rows, notes=notes, repeats=args.repeats, threads=args.threads,
                      peer_threads=args.peer_threads)
    print(f"wrote {path}")
    return 0
