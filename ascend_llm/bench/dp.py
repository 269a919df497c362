"""`ascend-llm bench dp`: data-parallel throughput on CPU, 1 process vs 2 msrun workers, same global batch.

Both runs go through the launcher (`ascend_llm.cluster.launch`) with this file as the worker script: each
worker trains with the real trainer, then times the gradient all-reduce alone (a jitted mean-all-reduce of
tensors shaped like the model's parameters). tokens/s is the median of the per-step rates the trainer logs,
after the first (compiling) step. Prints a table and writes JSON (default bench_results/dp.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ascend_llm.store.files import write_file_atomic

WORKER_FLAG = "--worker-out"


def _time_allreduce(params, world: int, repeats: int) -> float:
    """Milliseconds per call of the mean all-reduce over tensors shaped like `params` (0 for one process)."""
    if world == 1:
        return 0.0
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor

    from ascend_llm.parallel.dp import build_grad_reducer

    reducer = build_grad_reducer(None, world)
    grads = tuple(Tensor(np.ones(p.shape, np.float32)) for p in params)

    @ms.jit
    def reduce(g):
        return reducer(g)

    for _ in range(2):
        reduce(grads)[-1].asnumpy()
    start = time.perf_counter()
    for _ in range(repeats):
        out = reduce(grads)
    out[-1].asnumpy()
    return (time.perf_counter() - start) * 1000 / repeats


def worker_main(argv: list[str]) -> int:
    """Runs on every worker: train, then time the all-reduce; rank 0 writes the numbers to --worker-out."""
    out_path = next(a.split("=", 1)[1] for a in argv if a.startswith(WORKER_FLAG + "="))
    overrides = [a for a in argv if not a.startswith(WORKER_FLAG + "=")]
    import ascend_llm.train.trainer as trainer
    from ascend_llm.compose import compose_recipe
    from ascend_llm.parallel.dp import is_main_rank
    from ascend_llm.train.build import build_training_model

    recipe = compose_recipe(overrides)
    summary = trainer.train(recipe)
    params = build_training_model(recipe).trainable_params()  # same shapes as the trained model
    world = summary["world_size"]
    allreduce_ms = _time_allreduce(params, world, repeats=10)
    if is_main_rank():
        records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in records if r["step"] > summary["start_step"] + 1]
        result = {"world_size": world, "tokens_per_s": statistics.median(rates), "allreduce_ms": allreduce_ms,
                  "num_params": int(sum(p.size for p in params)), "first_step_s": summary["first_step_s"]}
        write_file_atomic(out_path, json.dumps(result))
    return 0


def _run(label: str, overrides: list[str], work: Path) -> dict:
    from ascend_llm.cluster.launch import build_launch_plan, describe_plan
    from ascend_llm.cluster.supervise import run_plan
    from ascend_llm.compose import compose_recipe

    out = work / f"{label}.json"
    plan = build_launch_plan(compose_recipe(overrides), overrides, script=__file__,
                             script_args=[f"{WORKER_FLAG}={out}"])
    print(describe_plan(plan).splitlines()[-1], flush=True)
    with open(work / f"{label}.console.log", "w") as console:
        result = run_plan(plan, out=console)
    if result.returncode != 0:
        raise RuntimeError(f"{label} run failed:\n{result.report()}")
    data = json.loads(out.read_text())
    data["wall_s"] = result.elapsed_s
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-llm bench dp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default="bench_results/dp.json")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for both runs")
    return parser


def main(argv: list[str]) -> int:
    if any(a.startswith(WORKER_FLAG + "=") for a in argv):
        return worker_main(argv)
    args = build_parser().parse_args(argv)
    from ascend_llm.bench.report import print_table, write_json
    from ascend_llm.cluster.launch import find_free_port

    work = Path(tempfile.mkdtemp(prefix="bench_dp_"))
    common = [f"model={args.model}", f"train.num_steps={args.steps}", f"train.global_batch_size={args.global_batch}",
              f"data.seq_len={args.seq_len}", "train.log_every=1", "train.val_every=100000",
              "train.ckpt_every=100000", "train.progress=false", "train.sample_tokens=0", *args.overrides]
    runs = {
        "1 process": _run("single", [*common, f"train.output_dir={work / 'single'}"], work),
        "2 msrun workers": _run("dp2", [*common, f"train.output_dir={work / 'dp2'}", "cluster=cpu_2proc",
                                        "parallel=dp2", f"cluster.master_port={find_free_port()}",
                                        "cluster.tail_worker_log=none"], work),
    }
    base = runs["1 process"]["tokens_per_s"]
    rows = []
    for name, run in runs.items():
        step_ms = args.global_batch * args.seq_len / run["tokens_per_s"] * 1000
        rows.append({"setup": name, "workers": run["world_size"], "model": args.model,
                     "global_batch": args.global_batch, "seq_len": args.seq_len,
                     "tokens/s": f"{run['tokens_per_s']:.0f}", "step_ms": f"{step_ms:.0f}",
                     "allreduce_ms/step": f"{run['allreduce_ms']:.1f}",
                     "allreduce_share": f"{run['allreduce_ms'] / step_ms:.0%}",
                     "speedup": f"{run['tokens_per_s'] / base:.2f}x", "job_wall_s": f"{run['wall_s']:.0f}"})
    print_table(rows, list(rows[0]))
    path = write_json(args.output, "dp", rows, num_params=runs["1 process"]["num_params"], steps=args.steps,
                      note="CPU, 2 cores shared by all workers; all-reduce timed alone on parameter-shaped tensors")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
