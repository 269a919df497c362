"""`ascend-llm plan [overrides] [--json]`: per-device memory and step-time plan of a training recipe.

Prints every memory term (parameters, gradients, accumulation buffer, master weights, optimizer state,
activations by attention backend and recompute mode, logits, update temporaries, HCCL buffers, fragmentation
headroom) with its formula, source and phase of the step (the peak is the always-alive terms plus the largest
phase), the budget (cluster.device_memory_gib and runtime.max_device_memory; Ascend recipes only: off Ascend no
verdict is given), a tokens-per-second upper bound beside the published 910B figures and, when the recipe does
not fit, the smallest changes that do (each passes the trainer's pre-start checks). Exit status 2 when it does
not fit (one line on stderr), else 0.
"""

from __future__ import annotations

import argparse
import json

from ascend_llm.compose import compose_recipe

EXAMPLES = """examples:
  ascend-llm plan experiment=llama3_8b_910b
  ascend-llm plan experiment=llama3_8b_910b parallel.zero_stage=0 train.recompute=none --json
  ascend-llm plan experiment=mindformers_llama3_8b_8k_dp8          # a published MindFormers DP8 run"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm plan", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. experiment=llama3_8b_910b")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    from ascend_llm.parallel.plan import check_fits, format_plan, plan_json, plan_recipe

    recipe = compose_recipe(args.overrides)
    planned = plan_recipe(recipe, with_suggestions=True)
    print(json.dumps(plan_json(recipe, planned), indent=2) if args.json else format_plan(recipe, planned),
          flush=True)
    if planned.memory.fits is False:
        recipe.train.memory_check = True
        check_fits(recipe)  # raises the one-line ConfigError: exit 2
    return 0
