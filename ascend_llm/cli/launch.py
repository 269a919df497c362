"""`ascend-llm launch [overrides] [--dry-run] [--script PATH]`: run a recipe on every worker of this node.

The recipe's `cluster/` group says how: msrun's dynamic cluster (default), msrun with an HCCL rank table
(`cluster.rank_table_file`), or rank-table mode without msrun (`cluster.launcher=rank_table`). The command
is printed with the layout (which rank holds which dp/cp/tp coordinates), then run; `--dry-run` only prints
them. Every worker runs `ascend-llm train <overrides>` (or
`python <script> <overrides> [script args]` with --script); a fresh run into a train.output_dir that holds another
run is refused before anything starts, as `train` refuses it. If a worker fails, the failed rank and the tail
of its log are printed and the exit status is non-zero; `cluster.job_timeout_s` bounds the whole job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ascend_llm.cluster.launch import build_launch_plan, describe_plan
from ascend_llm.cluster.preflight import preflight
from ascend_llm.compose import compose_recipe

EXAMPLES = """examples:
  ascend-llm launch cluster=cpu_2proc parallel=dp2 model=debug train.num_steps=20
  ascend-llm launch cluster=910b_1x8 parallel=dp8 experiment=llama3_8b_910b --dry-run
  ascend-llm launch cluster=910b_2x8 parallel=dp16 cluster.master_addr=10.0.0.1 cluster.node_rank=1
  ascend-llm launch cluster=910b_1x8_rank_table parallel=dp8 cluster.launcher=rank_table --dry-run
  ascend-llm launch cluster=cpu_2proc parallel=dp2 --script my_job.py -- --my-flag 1"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-llm launch", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value), passed on to every worker")
    parser.add_argument("--dry-run", action="store_true", help="print the command(s) and exit")
    parser.add_argument("--script", help="run this Python script on every worker instead of the trainer; it "
                        "receives the overrides, then the arguments after `--`")
    return parser


def check_output_dir(recipe) -> None:
    """The trainer's own check of train.output_dir (`guard_fresh_run`), before msrun starts: a fresh run into a
    folder holding another run is one ConfigError (exit 2). With train.overwrite=true nothing is checked or removed
    here: rank 0 of the job clears the folder."""
    cfg = recipe.train
    if cfg.resume == "none" and not cfg.overwrite:
        from ascend_llm.train.checkpoint import guard_fresh_run

        guard_fresh_run(Path(cfg.output_dir), overwrite=False)


def main(argv: list[str]) -> int:
    argv = list(argv)
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    recipe = preflight(compose_recipe(args.overrides))
    if args.script is None:
        check_output_dir(recipe)
    plan = build_launch_plan(recipe, args.overrides, script=args.script, script_args=script_args)
    print(describe_plan(plan), flush=True)
    if recipe.parallel.world_size > 1:
        from ascend_llm.parallel.dims import describe_layout

        print("# layout (rank = (dp * cp + cp_index) * tp + tp_index):\n# " + "\n# ".join(describe_layout(
            recipe.parallel)), flush=True)
    if args.dry_run:
        return 0
    from ascend_llm.cluster.supervise import run_plan

    result = run_plan(plan, out=sys.stdout)  # the CLI's pipe-safe stdout: a closed pipe never stops the job
    print(result.report(), file=sys.stderr if result.returncode else sys.stdout, flush=True)
    return result.returncode
