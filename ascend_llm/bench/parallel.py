"""`ascend-llm bench parallel`: step time, communication time and per-rank peak memory of each parallel layout on
CPU under real msrun, the longest sequence that trains under a per-rank memory cap (cp1 vs cp2), and the
planner's estimates for Llama 3 8B on Ascend 910B.

Every layout runs as its own job through the launcher (`ascend_llm.cluster.launch`, msrun for 2 and 4 workers)
with this file as the worker script, on the same model, global batch and sequence length, fp32:

- step time: the median wall time of the trainer's own step (`train.trainer.run_step`: read the batch, forward
  and backward, reduce, clip, AdamW; ends in a host sync) over `--steps` steps after `--warmup` steps, rank 0;
- communication time per step: one more step runs eagerly (PyNative) while `bench.collectives` records every
  collective it issues (kind, group, shape, dtype); the job then replays that exact sequence alone, compiled, on
  zero tensors, and the median replay time is the column (no compute in between, so no overlap and no waiting
  for a slower peer: a lower bound of what the step spends in collectives);
- per-rank peak memory: each rank's own VmHWM (peak RSS of its process, /proc/self/status) after the timed steps.

Context parallel, longest sequence: for cp1 (one process) and cp2 (2 workers), one training step (forward,
backward and update, global batch 1) at a sequence length, each trial in a fresh job; a length fits when every
rank's VmHWM stays under `--memory-cap-gib`. Lengths are searched over multiples of `--seq-unit` (a multiple of
2*cp, the zigzag granularity): doubling, then bisection (`longest_fitting`).

Planner rows (`parallel/plan.py`) are estimates for Ascend 910B, not measurements. Prints tables and writes
JSON (`--json PATH`, atomic). Bad options: one line naming the option, exit 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ascend_llm.errors import ConfigError
from ascend_llm.store.files import write_file_atomic

WORKER_FLAG = "--bench-worker"  # --bench-worker=<task>:<out path prefix>
TASKS = ("step", "trial")
# layout name -> (number of workers, recipe overrides); tp innermost (parallel/dims.py)
LAYOUTS = {
    "single": (1, ["cluster=cpu_1proc", "parallel=single"]),
    "dp2": (2, ["cluster=cpu_2proc", "parallel=dp2"]),
    "tp2": (2, ["cluster=cpu_2proc", "parallel=tp2"]),
    "tp2_sp": (2, ["cluster=cpu_2proc", "parallel=tp2", "parallel.sequence_parallel=true"]),
    "cp2": (2, ["cluster=cpu_2proc", "parallel=cp2"]),
    "tp2_dp2": (4, ["cluster=cpu_4proc", "parallel=tp2_dp2"]),
    "cp2_dp2": (4, ["cluster=cpu_4proc", "parallel=cp2_dp2"]),
}
TWO_WORKER_LAYOUTS = ("single", "dp2", "tp2", "tp2_sp", "cp2")
FOUR_WORKER_LAYOUTS = ("tp2_dp2", "cp2_dp2")
# Llama 3 8B on one 910B node (8 NPUs) at the recipe layouts: (label, overrides)
PLANNER_LAYOUTS = (
    ("dp8 zero2, 4096", ["experiment=llama3_8b_910b"]),
    ("tp2 sp dp4 zero1 fp32 params, 4096", ["experiment=llama3_8b_910b", "parallel=tp2_dp4_zero1",
                                            "precision.param_dtype=float32"]),
    ("tp4 sp dp2, 8192", ["experiment=llama3_8b_8k_910b"]),
    ("tp4 sp cp2 dp1, 8192", ["experiment=llama3_8b_8k_910b", "parallel.data_parallel_degree=1",
                          "parallel.context_parallel_degree=2"]),
)
GIB = 1024**3
COMMON = ["train.log_every=1000000", "train.val_every=1000000", "train.ckpt_every=1000000", "train.progress=false",
          "train.sample_tokens=0", "precision=fp32"]


# ---------------------------------------------------------------------------------------------- worker side

def _vmhwm_mib() -> float:
    from ascend_llm.bench.peak_memory import read_status_kib

    return read_status_kib(("VmHWM",))["VmHWM"] / 1024


def _write_atomic(path: str, data: dict) -> None:
    write_file_atomic(path, json.dumps(data))


def _eager_steps(session):
    """The session's step functions rebuilt for PyNative (so each collective is a Python call to record)."""
    import mindspore as ms

    from ascend_llm.train.step import build_step_functions

    recipe = session.recipe
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return build_step_functions(session.model, session.optimizer, recipe.optim.grad_clip,
                                session.layout.grad_reducer(session.world_size), session.precision.scaler, False,
                                grad_norm=session.layout.grad_norm(session.optimizer.params),
                                objective=session.objective)


def step_worker(overrides: list[str], out_prefix: str, steps: int, warmup: int, repeats: int) -> None:
    """Every rank: time `steps` trainer steps after `warmup`, read VmHWM, record one eager step's collectives and
    time their replay; writes <out_prefix>.rank<r>.json."""
    from ascend_llm.bench.collectives import record_collectives, summarize, time_replay
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.session import build_session
    from ascend_llm.train.trainer import run_step

    session = build_session(compose_recipe(overrides))
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        run_step(session, step)
        times.append((time.perf_counter() - start) * 1000)
    peak = _vmhwm_mib()
    session.steps = _eager_steps(session)
    with record_collectives() as calls:
        run_step(session, warmup + steps)
    comm_ms = time_replay(calls, repeats)
    _write_atomic(f"{out_prefix}.rank{session.rank}.json",
                  {"rank": session.rank, "world_size": session.world_size, "coordinates": session.layout.coordinates(),
                   "step_ms": times[warmup:], "peak_rss_mib": peak, "comm_ms": comm_ms, **summarize(calls)})


def trial_worker(overrides: list[str], out_prefix: str) -> None:
    """Every rank: one training step at the recipe's sequence length; writes <out_prefix>.rank<r>.json."""
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.session import build_session
    from ascend_llm.train.trainer import run_step

    session = build_session(compose_recipe(overrides))
    outcome = run_step(session, 0)
    _write_atomic(f"{out_prefix}.rank{session.rank}.json",
                  {"rank": session.rank, "peak_rss_mib": _vmhwm_mib(), "loss": outcome.loss})


def worker_main(argv: list[str]) -> int:
    flag = next(a for a in argv if a.startswith(WORKER_FLAG + "="))
    task, out_prefix = flag.split("=", 1)[1].split(":", 1)
    numbers = {a.split("=", 1)[0]: int(a.split("=", 1)[1]) for a in argv if a.startswith("--n-")}
    overrides = [a for a in argv if a != flag and not a.startswith("--n-")]
    if task == "step":
        step_worker(overrides, out_prefix, numbers["--n-steps"], numbers["--n-warmup"], numbers["--n-repeats"])
    else:
        trial_worker(overrides, out_prefix)
    return 0


# ---------------------------------------------------------------------------------------------- bench side

def run_job(overrides: list[str], work: Path, label: str, task: str, numbers: dict[str, int] | None = None) -> list:
    """Launch this file under the launcher (msrun for > 1 worker) and return every rank's JSON, rank order."""
    from ascend_llm.cluster.launch import build_launch_plan, find_free_port
    from ascend_llm.cluster.supervise import run_plan
    from ascend_llm.compose import compose_recipe

    run_dir = work / label
    overrides = [*overrides, f"train.output_dir={run_dir}", f"cluster.master_port={find_free_port()}",
                 "cluster.tail_worker_log=none"]
    recipe = compose_recipe(overrides)
    prefix = work / f"{label}.{task}"
    args = [f"{WORKER_FLAG}={task}:{prefix}", *(f"--n-{k}={v}" for k, v in (numbers or {}).items())]
    plan = build_launch_plan(recipe, overrides, script=__file__, script_args=args)
    with open(work / f"{label}.console.log", "w") as console:
        result = run_plan(plan, out=console)
    if result.returncode != 0:
        raise RuntimeError(f"{label} ({task}) failed:\n{result.report()}")
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(recipe.parallel.world_size)]


def layout_row(name: str, ranks: list[dict], args) -> dict:
    """One table row from every rank's numbers (step time and collectives of rank 0, peaks of all ranks)."""
    first = ranks[0]
    step_ms = statistics.median(first["step_ms"])
    peaks = [r["peak_rss_mib"] for r in ranks]
    return {"layout": name, "workers": len(ranks), "model": args.model, "global_batch": args.global_batch,
            "seq_len": args.seq_len, "step_ms": round(step_ms, 1), "comm_ms": round(first["comm_ms"], 1),
            "comm_share": f"{first['comm_ms'] / step_ms:.0%}", "collectives": first["num_calls"],
            "comm_MiB": round(first["num_bytes"] / 2**20, 2),
            "peak_rss_mib": "/".join(str(round(p)) for p in peaks), "max_peak_mib": round(max(peaks)),
            "by_kind": first["by_kind"], "sequence": first["sequence"]}


def longest_fitting(fits: Callable[[int], bool], unit: int, max_len: int) -> tuple[int, list[tuple[int, bool]]]:
    """The largest multiple of `unit` up to `max_len` for which `fits` is true, assuming it is monotone (true up
    to some length, false beyond): double from `unit` until a failure or `max_len`, then bisect between the last
    success and the first failure. Returns (length, [(length, fits), ...] in trial order); length 0 when even
    `unit` does not fit. Each call of `fits` is one trial."""
    trials: list[tuple[int, bool]] = []

    def trial(length: int) -> bool:
        ok = fits(length)
        trials.append((length, ok))
        return ok

    top = max_len // unit * unit  # the largest candidate
    good, bad, length = 0, None, unit
    while length <= top:
        if not trial(length):
            bad = length
            break
        good = length
        if length == top:
            return good, trials
        length = min(2 * length, top)
    if bad is None:
        return good, trials
    low, high = good // unit, bad // unit  # fits at low*unit (or low == 0), fails at high*unit
    while high - low > 1:
        mid = (low + high) // 2
        if trial(mid * unit):
            low = mid
        else:
            high = mid
    return low * unit, trials


def context_search(args, work: Path) -> list[dict]:
    """Longest training sequence under the memory cap, cp1 (one process) vs cp2 (2 workers)."""
    cap_mib = args.memory_cap_gib * 1024
    rows = []
    for cp, layout in ((1, "single"), (2, "cp2")):
        peaks: dict[int, float] = {}

        def fits(seq_len: int, cp=cp, layout=layout, peaks=peaks) -> bool:
            overrides = [*LAYOUTS[layout][1], f"model={args.model}", "train.global_batch_size=1",
                         f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}", *COMMON, *args.overrides]
            ranks = run_job(overrides, work, f"search_cp{cp}_{seq_len}", "trial")
            peaks[seq_len] = max(r["peak_rss_mib"] for r in ranks)
            print(f"  cp{cp} seq_len {seq_len}: max per-rank peak {peaks[seq_len]:.0f} MiB "
                  f"({'fits' if peaks[seq_len] <= cap_mib else 'over'} {cap_mib:.0f} MiB)", flush=True)
            return peaks[seq_len] <= cap_mib

        best, trials = longest_fitting(fits, args.seq_unit, args.max_seq_len)
        rows.append({"context_parallel": f"cp{cp}", "workers": cp, "memory_cap_gib": args.memory_cap_gib,
                     "longest_seq_len": best, "peak_at_longest_mib": round(peaks[best]) if best else None,
                     "limit": "max_seq_len" if best == args.max_seq_len else "memory cap",
                     "trials": [{"seq_len": s, "fits": ok, "peak_mib": round(peaks[s])} for s, ok in trials]})
    return rows


def planner_rows() -> list[dict]:
    """Planner estimates (not measurements) for Llama 3 8B on one 910B node at the recipe layouts."""
    from ascend_llm.compose import compose_recipe
    from ascend_llm.parallel.plan import plan_recipe

    rows = []
    for label, overrides in PLANNER_LAYOUTS:
        recipe = compose_recipe(overrides)
        planned = plan_recipe(recipe)
        lay, mem, est = planned.layout, planned.memory, planned.time
        rows.append({"source": "planner estimate (Ascend 910B), not measured", "model": recipe.model.name,
                     "layout": label, "dp": lay.data_parallel_degree, "tp": lay.tensor_parallel_degree,
                     "cp": lay.context_parallel_degree, "sp": lay.sequence_parallel, "zero": lay.zero_stage,
                     "seq_len": lay.seq_len, "memory_gib_per_npu": round(mem.total_bytes / GIB, 1),
                     "fits": mem.fits, "step_s": round(est.step_s, 2),
                     "comm_s": round(sum(est.comm_s.values()), 3),
                     "tokens_per_s_per_npu": round(est.tokens_per_s_per_device)})
    return rows


PARTS = ("layouts", "search", "planner")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-llm bench parallel", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="debug", help="model recipe")
    parser.add_argument("--layouts", default=",".join(TWO_WORKER_LAYOUTS),
                        help=f"comma list of {', '.join(LAYOUTS)} (default the 1- and 2-worker ones)")
    parser.add_argument("--four-workers", action="store_true",
                        help=f"also run {' and '.join(FOUR_WORKER_LAYOUTS)} (4 workers: slow on 2 cores)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--repeats", type=int, default=10, help="replays of the recorded collectives")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step (train.global_batch_size)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of the layout runs")
    parser.add_argument("--memory-cap-gib", type=float, default=1.5, help="per-rank peak RSS cap for the search")
    parser.add_argument("--seq-unit", type=int, default=1024, help="the search's length step (a multiple of 4)")
    parser.add_argument("--max-seq-len", type=int, default=32768, help="the search's longest length")
    parser.add_argument("--json", default="bench_results/parallel.json", help="where to write the JSON")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    return parser


def _names(option: str, text: str, allowed) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ConfigError(option, text, f"a comma list of {', '.join(allowed)}")
    return names


def validate(args) -> list[str]:
    """Check the options (ConfigError naming the first bad one); returns the layouts to run."""
    layouts = _names("--layouts", args.layouts, LAYOUTS)
    if args.four_workers:
        layouts += [n for n in FOUR_WORKER_LAYOUTS if n not in layouts]
    args.parts = _names("--parts", args.parts, PARTS)
    for option in ("steps", "warmup", "repeats", "global_batch", "seq_len", "seq_unit", "max_seq_len"):
        if getattr(args, option) < 1:
            raise ConfigError(f"--{option.replace('_', '-')}", getattr(args, option), "must be >= 1")
    if "layouts" in args.parts:
        if any("dp2" in n for n in layouts) and args.global_batch % 2:
            raise ConfigError("--global-batch", args.global_batch, "must be even (the dp2 layouts split it in two)")
        if any(n.startswith(("cp2", "tp2")) for n in layouts) and args.seq_len % 4:
            raise ConfigError("--seq-len", args.seq_len, "must be a multiple of 4 (2*cp zigzag chunks; sequence "
                              "parallel splits each CP shard over tp=2)")
    if "search" in args.parts:
        if not args.memory_cap_gib > 0:
            raise ConfigError("--memory-cap-gib", args.memory_cap_gib, "must be > 0")
        if args.seq_unit % 4:
            raise ConfigError("--seq-unit", args.seq_unit, "must be a multiple of 4 (2*cp for cp2)")
        if args.max_seq_len < args.seq_unit:
            raise ConfigError("--max-seq-len", args.max_seq_len, f"must be >= --seq-unit={args.seq_unit}")
    return layouts


def measure_layouts(layouts: list[str], args, work: Path) -> list[dict]:
    rows = []
    numbers = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    for name in layouts:
        overrides = [*LAYOUTS[name][1], f"model={args.model}", f"train.global_batch_size={args.global_batch}",
                     f"data.seq_len={args.seq_len}", f"train.num_steps={args.warmup + args.steps + 1}", *COMMON,
                     *args.overrides]
        print(f"layout {name}: {LAYOUTS[name][0]} worker(s)", flush=True)
        rows.append(layout_row(name, run_job(overrides, work, name, "step", numbers), args))
    return rows


LAYOUT_COLUMNS = ["layout", "workers", "step_ms", "comm_ms", "comm_share", "collectives", "comm_MiB", "peak_rss_mib"]
SEARCH_COLUMNS = ["context_parallel", "workers", "memory_cap_gib", "longest_seq_len", "peak_at_longest_mib", "limit"]
PLANNER_COLUMNS = ["layout", "seq_len", "memory_gib_per_npu", "fits", "step_s", "comm_s", "tokens_per_s_per_npu"]
COMM_NOTE = ("comm_ms: the collectives one eager step issues (recorded: kind, group, shape), replayed alone, "
             "compiled, median of --repeats; no compute between them, so no overlap or peer skew (a lower bound)")


def report(results: dict, args) -> None:
    from ascend_llm.bench.report import print_table, write_json

    if results.get("layouts"):
        print(f"\nCPU, fp32, model={args.model}, global batch {args.global_batch} x {args.seq_len} tokens, median "
              f"of {args.steps} steps after {args.warmup} (2 cores shared by every worker)")
        print_table(results["layouts"], LAYOUT_COLUMNS)
        print(COMM_NOTE + "; peak_rss_mib: each rank's own VmHWM, rank order")
    if results.get("search"):
        print(f"\nlongest sequence that trains (one step, global batch 1, model={args.model}) with every rank's "
              f"VmHWM <= {args.memory_cap_gib} GiB; lengths multiples of {args.seq_unit}")
        print_table(results["search"], SEARCH_COLUMNS)
    if results.get("planner"):
        print("\nAscend 910B: planner estimates (parallel/plan.py), not measurements; llama3_8b, 8 NPUs")
        print_table(results["planner"], PLANNER_COLUMNS)
    rows = [dict(r, part=part) for part in PARTS for r in results.get(part, [])]
    path = write_json(args.json, "parallel", rows, comm_note=COMM_NOTE, model=args.model, steps=args.steps,
                      warmup=args.warmup, note="CPU rows measured under msrun on a shared 2-core machine; "
                      "planner rows are Ascend 910B estimates, not measurements")
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    if any(a.startswith(WORKER_FLAG + "=") for a in argv):
        return worker_main(argv)
    args = build_parser().parse_args(argv)
    layouts = validate(args)
    results: dict[str, list[dict]] = {}
    if "planner" in args.parts:
        results["planner"] = planner_rows()  # pure Python: bad overrides fail here, before any job
    with tempfile.TemporaryDirectory(prefix="bench_parallel_") as tmp:
        work = Path(tmp)
        if "layouts" in args.parts:
            results["layouts"] = measure_layouts(layouts, args, work)
        if "search" in args.parts:
            results["search"] = context_search(args, work)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
