"""Mixed-precision benchmark: train the tiny model on real Chinese text once per precision recipe (same seed,
same data order) and compare final train/validation loss and step time with fp32. Prints a table, writes JSON.

  python scripts/bench_precision.py [--steps 300] [--precisions fp32,bf16,fp16,fp8,fp8_dynamic]
                                    [--engine auto|trainer|builtin] [--out bench_results/precision.json]
                                    [recipe overrides ...]

Engines. `trainer`: `ascend_llm.train.trainer.train(recipe)` per precision, one after another. `builtin`: a
training loop in this module that follows the trainer contract of `ascend_llm.precision` (the trainer's data
pipeline, AdamW, LR schedule and clipping; precision converters, loss scaler and controller from the package)
and steps all precisions in lockstep in one process, so each step of each precision runs under the same
machine load (this machine is shared). `auto`: the trainer when it applies the precision recipe, else builtin.

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
from dataclasses import dataclass, field
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


def trainer_applies_precision() -> bool:
    """True when ascend_llm.train's model builder already runs apply_precision/apply_fp8."""
    try:
        from ascend_llm.train.build import build_training_model
    except ImportError:
        return False
    from ascend_llm.config import compose_recipe
    from ascend_llm.precision import describe_precision

    recipe = compose_recipe(["model=debug", "precision=bf16"])
    return any(kind != "float32" for kind in describe_precision(build_training_model(recipe)).values())


@dataclass
class Run:
    """One precision trained by the builtin loop."""

    name: str
    recipe: object
    step_fn: object = None
    scaler: object = None
    controller: object = None
    layers: str = ""
    losses: list = field(default_factory=list)
    times: list = field(default_factory=list)
    decisions: list = field(default_factory=list)


def build_run(name: str, overrides: list[str]) -> Run:
    import mindspore as ms
    from mindspore import amp

    from ascend_llm.attention.apply import apply_attention
    from ascend_llm.config import compose_recipe
    from ascend_llm.models import build_model
    from ascend_llm.precision import apply_fp8, apply_precision, build_controller, build_loss_scaler, describe_precision
    from ascend_llm.train.optim import AdamW, clip_by_global_norm
    from ascend_llm.train.step import cross_entropy_loss

    recipe = compose_recipe([*overrides, f"precision={name}"])
    model = build_model(recipe.model, seed=recipe.train.seed)
    apply_attention(model, recipe.attention)
    apply_precision(model, recipe.precision)  # the contract: once after build, before compile, then FP8
    apply_fp8(model, recipe.precision)
    params = model.trainable_params()
    optimizer = AdamW(params, recipe.optim)
    scaler = build_loss_scaler(recipe.precision)
    controller = build_controller(model, recipe.precision)
    clip = recipe.optim.grad_clip

    def forward(x, y):
        return scaler.scale(cross_entropy_loss(model(x), y))

    grad_fn = ms.value_and_grad(forward, None, params)

    @ms.jit
    def step(x, y, lr):
        loss, grads = grad_fn(x, y)
        grads = scaler.unscale(grads)
        finite = scaler.adjust(amp.all_finite(grads))
        grads, norm = clip_by_global_norm(grads, clip)
        if finite:
            optimizer(grads, lr)
        return scaler.unscale(loss), norm

    kinds = list(describe_precision(model).values())
    layers = ", ".join(f"{kinds.count(k)} {k}" for k in ("fp8", "bfloat16", "float16") if kinds.count(k))
    return Run(name, recipe, step, scaler, controller, layers or "all float32")


def run_builtin(names: list[str], overrides: list[str], steps: int) -> list[dict]:
    import mindspore as ms
    from mindspore import Tensor

    from ascend_llm.config import compose_recipe
    from ascend_llm.data import PackedDataset, prepare
    from ascend_llm.train.runtime import setup_runtime
    from ascend_llm.train.schedule import lr_at

    recipe = compose_recipe(overrides)
    setup_runtime(recipe.runtime)
    ms.set_seed(recipe.train.seed)
    runs = [build_run(name, overrides) for name in names]
    prepared = prepare(recipe.data)
    dataset = PackedDataset(prepared.tokens(), recipe.data.seq_len, recipe.data.val_fraction, recipe.data.seed)
    batch = recipe.train.global_batch_size
    print(f"[bench precision] builtin lockstep loop: {', '.join(names)}; {steps} steps of {batch}x"
          f"{recipe.data.seq_len} tokens; corpus {prepared.meta['num_tokens']:,} tokens", file=sys.stderr)
    first = {}
    for step in range(steps):
        x, y = (Tensor(a) for a in dataset.batch(dataset.train_indices(step * batch, batch)))
        lr = Tensor(np.float32(lr_at(step, recipe.optim, steps)))
        for run in runs:
            start = time.perf_counter()
            loss, _ = run.step_fn(x, y, lr)
            value = float(loss.asnumpy())
            elapsed = time.perf_counter() - start
            if step == 0:
                first[run.name] = elapsed
            else:
                run.times.append(elapsed)
            run.losses.append(value)
            run.scaler.step(step + 1)
            run.decisions += run.controller.step(step + 1)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            print(f"[bench precision] step {step + 1}: " + "  ".join(f"{r.name}={r.losses[-1]:.4f}" for r in runs),
                  file=sys.stderr, flush=True)
    # Validation reuses each compiled train step with lr=0 (its loss is computed before the update) instead of
    # compiling a second, forward-only graph per precision (about 4 GB each on CPU). It runs after the last
    # training step, so the Adam moments and FP8 histories it touches are never used again.
    val_rows = recipe.train.global_batch_size
    val_index = dataset.val_indices(val_rows * 8)
    zero = Tensor(np.float32(0.0))
    rows = []
    for run in runs:
        vals = []
        for start in range(0, len(val_index) - val_rows + 1, val_rows):
            vx, vy = dataset.batch(val_index[start:start + val_rows])
            vals.append(float(run.step_fn(Tensor(vx), Tensor(vy), zero)[0].asnumpy()))
        rows.append({"precision": run.name, "losses": run.losses, "val_loss": float(np.mean(vals)),
                     "step_s": statistics.median(run.times[4:] or run.times), "first_step_s": first[run.name],
                     "layers": run.layers, "skipped": run.scaler.metrics().get("loss_scale_skipped_steps", 0),
                     "decisions": len(run.decisions), "decision_log": run.decisions[:50]})
    return rows


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
    parser.add_argument("--engine", choices=("auto", "trainer", "builtin"), default="auto")
    parser.add_argument("--tail", type=int, default=20, help="train loss = mean over the last TAIL steps")
    parser.add_argument("--out", default="bench_results/precision.json")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args(argv)
    names = args.precisions.split(",")
    if "fp32" not in names:
        names.insert(0, "fp32")
    overrides = [*base_overrides(args.steps), *args.overrides]
    engine = args.engine
    if engine == "auto":
        engine = "trainer" if trainer_applies_precision() else "builtin"
    start = time.perf_counter()
    if engine == "trainer":
        with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
            rows = run_trainer(names, overrides, args.steps, Path(tmp))
    else:
        rows = run_builtin(names, overrides, args.steps)
    rows = summarize(rows, min(args.tail, args.steps))
    print(f"tiny model, {args.steps} steps, engine={engine}, overrides: {' '.join(overrides)}")
    print("FP8 is numerics emulation on CPU and on Ascend 910B (no FP8 arithmetic there): no speed-up expected.")
    print_table(rows, COLUMNS)
    table_rows = [{k: v for k, v in r.items() if k != "losses"} for r in rows]
    path = write_json(args.out, "precision", table_rows, engine=engine, steps=args.steps, overrides=overrides,
                      losses={r["precision"]: r["losses"] for r in rows}, wall_s=round(time.perf_counter() - start))
    print(f"wrote {path}")
    return 0
