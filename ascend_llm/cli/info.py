"""`ascend-llm info [overrides]`: what a recipe would train, without building it.

Prints the model's parameter counts (from the shapes alone, so 7B/8B flavors are instant), training FLOPs
per token, the tokens per optimizer step, and the per-DEVICE training memory from the planner (weights,
gradients, optimizer state, activations, buffers, headroom) against the declared budget; the terms one by
one, with formulas and suggestions, are in `ascend-llm plan`.
"""

from __future__ import annotations

import argparse

from ascend_llm.compose import compose_recipe
from ascend_llm.models.llama import count_params


def describe(overrides: list[str]) -> dict:
    from ascend_llm.parallel.plan import plan_recipe
    from ascend_llm.parallel.plan_time import flops_per_token

    recipe = compose_recipe(overrides)
    memory = plan_recipe(recipe).memory
    model = recipe.model
    total = count_params(model)
    return {
        "model": model.name,
        "parameters": total,
        "non_embedding_parameters": count_params(model, include_embedding=False),
        "layers": model.num_layers, "dim": model.dim, "heads": model.num_heads, "kv_heads": model.num_kv_heads,
        "seq_len": recipe.data.seq_len,
        "train_flops_per_token": flops_per_token(model, recipe.data.seq_len),
        "tokens_per_step": recipe.train.global_batch_size * recipe.data.seq_len,
        "world_size": recipe.parallel.world_size,
        "train_memory_per_device_gib": memory.total_bytes / 2**30,
        "fits_on_device": {True: "yes", False: "NO (see ascend-llm plan)", None: "no budget declared"}[memory.fits],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ascend-llm info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model=llama3_8b")
    facts = describe(parser.parse_args(argv).overrides)
    for key, value in facts.items():
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<28} {shown}")
    return 0
