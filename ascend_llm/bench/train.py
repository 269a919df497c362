"""Training throughput: tokens/s, MFU and time to first step for a model flavor on this machine,
graph vs pynative, each in a fresh process through the real CLI. Prints a table, writes JSON.

  python scripts/bench_train.py [--model tiny] [--steps 30] [--out bench_results/train.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
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
            "launch_to_first_step_s": round(summary["launch_to_first_step_s"], 2), "wall_s": round(wall, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", default="graph,pynative")
    parser.add_argument("--out", default="bench_results/train.json")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args(argv)
    peak = matmul_tflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            row = run_mode(mode, args.model, args.steps, args.overrides, Path(tmp))
            row["mfu_vs_measured_matmul"] = round(row["model_tflops"] / peak, 4)
            row["mfu_declared"] = round(row["mfu_declared"], 5)
            rows.append(row)
    print(f"measured fp32 MatMul peak on this machine: {peak:.3f} TFLOP/s (2048x2048)")
    print_table(rows, ["mode", "model", "tokens_per_step", "tokens_per_s", "step_ms", "model_tflops",
                       "mfu_vs_measured_matmul", "mfu_declared", "first_step_s", "launch_to_first_step_s"])
    path = write_json(args.out, "train", rows, measured_matmul_tflops=peak)
    print(f"wrote {path}")
    return 0
