"""`ascend-llm train [overrides]`: Hydra recipe -> training run. `--multirun`/`-m` sweeps work as in Hydra.

The recipe is composed and validated first (for a sweep: every combination), so bad overrides fail in one
line with exit 2 before Hydra starts or anything is written; then Hydra runs the job(s) (run directory =
train.output_dir, sweeps under train.output_dir/multirun).

SIGINT (Ctrl-C) or SIGTERM while training: the current step finishes (also the first one, while it compiles),
is checkpointed, one line says where, and the exit status is 130 (SIGINT) or 143 (SIGTERM); a second signal aborts
at once. Resume with train.resume=auto. A Ctrl-C outside the steps (data preparation, model loading, the closing
sample) stops at once with status 130; checkpoints are never half-written.
"""

from __future__ import annotations

import sys

from ascend_llm.cli.process import freeze_once
from ascend_llm.cluster.preflight import preflight
from ascend_llm.compose import compose_recipe, recipes_dir, register_schema, to_recipe
from ascend_llm.compose.overrides import check_group_options, expand_sweep, quote_overrides
from ascend_llm.errors import TrainingDiverged, UserInputError
from ascend_llm.train.stop import TrainingStopped

MULTIRUN_FLAGS = ("--multirun", "-m")


def _print_summary(summary: dict) -> None:
    if summary.get("rank", 0) != 0:
        return
    losses = summary["losses"]
    if losses:
        print(f"trained steps {summary['start_step'] + 1}..{summary['start_step'] + len(losses)}: "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; first step {summary['first_step_s']:.1f} s "
              f"({summary['launch_to_first_step_s']:.1f} s from launch)")
    for step, val in summary["val_losses"][-1:]:
        print(f"validation loss at step {step}: {val:.4f}")
    if "sample" in summary:
        print("sample:\n" + summary["sample"])
    print(f"run directory: {summary['run_dir']}")


def _stopped(exc: TrainingStopped) -> int:
    """One line (rank 0) for a run a signal stopped; returns its exit status (128 + signal number)."""
    if exc.rank == 0:
        print(exc.one_line(), file=sys.stderr, flush=True)
    return exc.exit_status


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nExample: ascend-llm train model=debug optim.lr=1e-3 train.num_steps=50\n"
              f"Recipes: {recipes_dir()}")
        return 0
    if not any(flag in argv for flag in MULTIRUN_FLAGS):
        from ascend_llm.train.trainer import train

        freeze_once()  # MindSpore is imported: out of the collector's scans where this command owns the process
        try:
            _print_summary(train(compose_recipe(argv)))
        except TrainingStopped as exc:
            return _stopped(exc)
        except KeyboardInterrupt:  # outside the step loop (preparing, or the closing sample): nothing to checkpoint
            print("interrupted by SIGINT outside the training steps; the checkpoints written are complete (resume "
                  "with train.resume=auto)", file=sys.stderr)
            return 130
        return 0
    import hydra

    overrides = quote_overrides([a for a in argv if a not in MULTIRUN_FLAGS], sweep=True)
    check_group_options(overrides, recipes_dir())
    for combination in expand_sweep(overrides):  # every job composes and validates before any runs
        preflight(compose_recipe(combination))
    register_schema()

    @hydra.main(config_path=str(recipes_dir()), config_name="train", version_base="1.3")
    def job(cfg) -> None:
        from ascend_llm.train.trainer import train

        try:
            recipe = to_recipe(cfg)
            from hydra.core.hydra_config import HydraConfig

            recipe.train.output_dir = HydraConfig.get().runtime.output_dir
            _print_summary(train(recipe))
        except UserInputError as exc:
            print(exc.one_line(), file=sys.stderr)
            sys.exit(2)
        except TrainingDiverged as exc:
            print(exc.one_line(), file=sys.stderr)
            sys.exit(3)
        except TrainingStopped as exc:
            sys.exit(_stopped(exc))

    saved = sys.argv
    sys.argv = ["ascend-llm train", "--multirun", *overrides]
    try:
        job()
    finally:
        sys.argv = saved
    return 0
