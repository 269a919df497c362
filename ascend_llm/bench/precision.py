"""Mixed-precision benchmark: train the tiny model on real Chinese text once per precision recipe (same seed,
same data order) and compare final train/validation loss and step time with fp32. Prints a table, writes JSON.

  python scripts/bench_precision.py [--steps 300] [--precisions fp32,bf16,fp16,fp8,fp8_dynamic]
                                    [--out bench_results/precision.json]
                                    [recipe overrides ...]

Each precision runs through the real CLI (`ascend-llm train`) in a fresh process, one after another.

Targets (issue 4): bf16 and fp8 final-loss gap to fp32 <= 0.5% (TransformerEngine accepts about 1.1%);
FP8-emulated step <= 1.3x the fp32 step. FP8 here (CPU) and on Ascend 910B is numerics emulation: an FP8
speed-up is not expected and not claimed; only Ascend 950 has FP8 arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ascend_llm.bench.report import print_table, write_json

PRECISIONS = "fp32,bf16,fp16,fp8,fp8_dynamic"
TANG = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "tang_poems.jsonl"
COLUMNS = ["precision", "train_loss", "val_loss", "gap_train_%", "gap_val_%", "step_ms", "step_vs_fp32",
           "first_step_s", "layers", "skipped", "decisions"]


def base_overrides(steps: int) -> list[str]:
    """The tiny model on the Tang poems (or the embedded stdlib corpus when the shared corpus is absent)."""
    data = "data=tang_poems" if TANG.is_file() else "data=stdlib"
    if TANG.is_file():
        data_path = [f"data.path={TANG}"]
    else:
        print(f"[bench precision] {TANG} absent: using the embedded corpus (data=stdlib)", file=sys.stderr)
        data_path = []
    return ["model=tiny", data, *data_path, f"train.num_steps={steps}"]


def run_trainer(names: list[str], overrides: list[str], steps: int, workdir: Path) -> list[dict]:
    """Each precision through the real CLI (`ascend-llm train`) in a fresh process, one after another."""
    import json
    import subprocess

    rows = []
    for name in names:
        out = workdir / name
        args = [sys.executable, "-m", "ascend_llm.cli.main", "train", *overrides, f"precision={name}",
                "train.log_every=1", f"train.val_every={steps}", "train.val_batches=8", f"train.ckpt_every={steps}",
                "train.sample_tokens=0", "train.progress=false", f"train.output_dir={out}"]
        print(f"[bench precision] {name}: ascend-llm train ... precision={name}", file=sys.stderr, flush=True)
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"precision={name} run failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]
        tokens = summary["tokens_per_step"]
        rates = [r["tokens_per_s"] for r in records if r.get("step", 0) > 5 and r.get("tokens_per_s")]
        events = [e for r in records for e in r.get("precision_events", [])]
        last = max(records, key=lambda r: r["step"])
        rows.append({"precision": name, "losses": losses, "val_loss": summary["val_losses"][-1][1],
                     "step_s": tokens / statistics.median(rates) if rates else float("nan"),
                     "first_step_s": summary.get("first_step_s", float("nan")),
                     "layers": precision_line(proc.stderr),
                     "skipped": last.get("loss_scale_skipped_steps", 0),
                     "decisions": sum(1 for e in events if "action" in e), "decision_log": events[:50]})
    return rows


def precision_line(log: str) -> str:
    """The trainer's "precision=<name>: N cells <kind>, ..." log line, without the name."""
    for line in log.splitlines():
        if "] precision=" in line and ": " in line:
            return line.split(": ", 1)[1].strip()
    return ""


def summarize(rows: list[dict], tail: int) -> list[dict]:
    """Add the comparison columns: train loss = mean of the last `tail` steps (same batches for every
    precision), gaps to fp32 in percent, step time relative to fp32."""
    ref = next((r for r in rows if r["precision"] == "fp32"), rows[0])
    ref_train = float(np.mean(ref["losses"][-tail:]))
    for row in rows:
        train_loss = float(np.mean(row["losses"][-tail:]))
        row.update({"train_loss": round(train_loss, 4), "final_step_loss": round(row["losses"][-1], 4),
                    "gap_train_%": round(100 * (train_loss - ref_train) / ref_train, 2),
                    "gap_val_%": round(100 * (row["val_loss"] - ref["val_loss"]) / ref["val_loss"], 2),
                    "val_loss": round(row["val_loss"], 4), "step_ms": round(1000 * row["step_s"], 1),
                    "step_vs_fp32": round(row["step_s"] / ref["step_s"], 2),
                    "first_step_s": round(row["first_step_s"], 1)})
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precisions", default=PRECISIONS)
    parser.add_argument("--tail", type=int, default=20, help="train loss = mean over the last TAIL steps")
    parser.add_argument("--out", default="bench_results/precision.json")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args(argv)
    names = args.precisions.split(",")
    if "fp32" not in names:
        names.insert(0, "fp32")
    overrides = [*base_overrides(args.steps), *args.overrides]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        rows = run_trainer(names, overrides, args.steps, Path(tmp))
    rows = summarize(rows, min(args.tail, args.steps))
    print(f"tiny model, {args.steps} steps, overrides: {' '.join(overrides)}")
    print("FP8 is numerics emulation on CPU and on Ascend 910B (no FP8 arithmetic there): no speed-up expected.")
    print_table(rows, COLUMNS)
    table_rows = [{k: v for k, v in r.items() if k != "losses"} for r in rows]
    path = write_json(args.out, "precision", table_rows, steps=args.steps, overrides=overrides,
                      losses={r["precision"]: r["losses"] for r in rows}, wall_s=round(time.perf_counter() - start))
    print(f"wrote {path}")
    return 0
