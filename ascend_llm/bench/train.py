"""Training throughput: tokens/s, MFU, time to first step and peak RSS for a model flavor on this machine,
graph vs pynative, each in a fresh process through the real CLI. Prints a table, writes JSON.

With --peer PATH (e.g. ../shared/peers/torch_llama.py) the PyTorch peer runs too, in its own process, with a
Python that has torch (--peer-python), on the same dims (model flavor, data.seq_len, train.global_batch_size),
and the table gains its row and the ratios ours/peer. Peak RSS is each child's own VmHWM (see bench/child.py).

  python scripts/bench_train.py [--model tiny] [--steps 30] [--peer PATH] [--out bench_results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ascend_llm.bench.child import run_child
from ascend_llm.bench.report import print_table, write_json


def matmul_tflops(size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 MatMul rate of MindSpore on this CPU: a realistic peak to read MFU against."""
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    ms.set_device("CPU")
    a = ms.Tensor(np.random.default_rng(0).standard_normal((size, size), dtype=np.float32))
    ops.matmul(a, a).asnumpy()
    start = time.perf_counter()
    for _ in range(repeats):
        ops.matmul(a, a).asnumpy()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def run_mode(mode: str, model: str, steps: int, extra: list[str], workdir: Path) -> dict:
    run_dir = workdir / mode
    args = [sys.executable, "-m", "ascend_llm.cli.main", "train", f"model={model}", f"runtime.mode={mode}",
            f"train.num_steps={steps}", "train.log_every=1", f"train.val_every={steps}", "train.val_batches=1",
            f"train.ckpt_every={steps}", "train.sample_tokens=0", "train.progress=false",
            f"train.output_dir={run_dir}", *extra]
    proc = run_child(args)
    wall = proc.wall_s
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in records if r["step"] > 3 and "tokens_per_s" in r]
    tps = statistics.median(steady)
    return {"mode": mode, "model": model, "steps": steps, "tokens_per_step": summary["tokens_per_step"],
            "tokens_per_s": round(tps, 1), "step_ms": round(1000 * summary["tokens_per_step"] / tps, 1),
            "mfu_declared": summary["flops_per_token"] * tps / summary["peak_flops"],
            "model_tflops": round(summary["flops_per_token"] * tps / 1e12, 4),
            "first_step_s": round(summary["first_step_s"], 2),
            "launch_to_first_step_s": round(summary["launch_to_first_step_s"], 2), "wall_s": round(wall, 1),
            "peak_rss_mib": None if proc.peak_rss_mib is None else round(proc.peak_rss_mib)}


PEER_TPS = re.compile(r"tokens/s\s+([0-9.]+)")


def peer_dims(model: str, overrides: list[str]) -> dict:
    """The peer's command-line dims from the composed recipe (same architecture, sequence length, batch)."""
    from ascend_llm.compose import compose_recipe

    recipe = compose_recipe([f"model={model}", *overrides])
    m = recipe.model
    return {"dim": m.dim, "layers": m.num_layers, "heads": m.num_heads, "kv-heads": m.num_kv_heads,
            "ffn": m.ffn_hidden_dim, "vocab": m.vocab_size, "seq": recipe.data.seq_len,
            "batch": recipe.train.global_batch_size}


def run_peer(path: str, python: str, dims: dict, steps: int, sdpa: bool) -> dict:
    """Run the peer script once; its last `tokens/s N` on stdout is its steady throughput."""
    args = [python, path, *(f"--{k}={v}" for k, v in dims.items()), f"--steps={steps}"] + (["--sdpa"] if sdpa else [])
    proc = run_child(args)
    found = PEER_TPS.findall(proc.stdout)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"peer {path} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}")
    tps = float(found[-1])
    tokens = dims["batch"] * dims["seq"]
    return {"mode": "peer-sdpa" if sdpa else "peer", "model": Path(path).name, "steps": steps,
            "tokens_per_step": tokens, "tokens_per_s": round(tps, 1), "step_ms": round(1000 * tokens / tps, 1),
            "wall_s": round(proc.wall_s, 1),
            "peak_rss_mib": None if proc.peak_rss_mib is None else round(proc.peak_rss_mib)}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module doc as written, and every option's default."""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench train", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--model", default="tiny", help="model flavor (recipes/model)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per mode")
    parser.add_argument("--modes", default="graph,pynative", help="MindSpore execution modes, comma-separated")
    parser.add_argument("--out", default="bench_results/train.json", help="JSON results (relative: to the cwd)")
    parser.add_argument("--peer", default=None, help="a peer script (e.g. ../shared/peers/torch_llama.py)")
    parser.add_argument("--peer-python", default=os.environ.get("ASCEND_LLM_PEER_PYTHON", "python3"),
                        help="a Python with torch for the peer ($ASCEND_LLM_PEER_PYTHON when set)")
    parser.add_argument("--peer-steps", type=int, default=None, help="the peer's timed steps; None: as many as --steps")
    parser.add_argument("--peer-sdpa", action="store_true", help="also run the peer with --sdpa")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args(argv)
    if args.peer and not Path(args.peer).is_file():
        print(f"bench train: --peer={args.peer!r}: no such file (a peer script, e.g. ../shared/peers/torch_llama.py)",
              file=sys.stderr)
        return 2
    peak = matmul_tflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            row = run_mode(mode, args.model, args.steps, args.overrides, Path(tmp))
            row["mfu_vs_measured_matmul"] = round(row["model_tflops"] / peak, 4)
            row["mfu_declared"] = round(row["mfu_declared"], 5)
            rows.append(row)
    if args.peer:
        rows += peer_rows(args, peer_dims(args.model, args.overrides))
        add_ratios(rows)
    print(f"measured fp32 MatMul peak on this machine: {peak:.3f} TFLOP/s (2048x2048)")
    print_table(rows, ["mode", "model", "tokens_per_step", "tokens_per_s", "step_ms", "model_tflops",
                       "mfu_vs_measured_matmul", "mfu_declared", "first_step_s", "launch_to_first_step_s",
                       "peak_rss_mib", "vs_peer_tokens_per_s", "vs_peer_peak_rss"])
    path = write_json(args.out, "train", rows, measured_matmul_tflops=peak)
    print(f"wrote {path}")
    return 0


def peer_rows(args, dims: dict) -> list[dict]:
    """Peer rows, and on every toolkit row its tokens/s and peak RSS as ratios to the (naive) peer's."""
    peer_steps = args.peer_steps if args.peer_steps is not None else args.steps
    peers = [run_peer(args.peer, args.peer_python, dims, peer_steps, sdpa=False)]
    if args.peer_sdpa:
        peers.append(run_peer(args.peer, args.peer_python, dims, peer_steps, sdpa=True))
    return peers


def add_ratios(rows: list[dict]) -> None:
    peer = next((r for r in rows if r["mode"] == "peer"), None)
    if peer is None:
        return
    for row in rows:
        row["vs_peer_tokens_per_s"] = round(row["tokens_per_s"] / peer["tokens_per_s"], 3)
        if row.get("peak_rss_mib") and peer.get("peak_rss_mib"):
            row["vs_peer_peak_rss"] = round(row["peak_rss_mib"] / peer["peak_rss_mib"], 3)
