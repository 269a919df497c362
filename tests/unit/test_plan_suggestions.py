"""The planner against published 910B runs and the trainer (issue 23): the three MindFormers DP8 configurations
fit in 64 GB, its tokens/s bound is never below a published figure, every suggestion it prints passes the
trainer's own pre-start checks, and off Ascend it says it plans Ascend memory only."""

from __future__ import annotations

import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.parallel.plan import format_plan, plan_recipe
from ascend_llm.parallel.plan_time import flops_per_token

GIB = 2**30
MINDFORMERS_DP8 = {  # experiment -> published tokens/s per NPU (MindFormers r1.3 model list)
    "mindformers_llama3_8b_8k_dp8": 2581,
    "mindformers_llama2_7b_4k_dp8": 4160,
    "mindformers_llama2_7b_4k_dp8_pretrain": 4160,
}
MODELLINK_TP8 = (["model=llama2_7b", "runtime=ascend", "precision=bf16", "attention=fused", "cluster=910b_1x8",
                  "parallel.data_parallel_degree=1", "parallel.tensor_parallel_degree=8",
                  "parallel.sequence_parallel=true", "data.seq_len=4096", "train.global_batch_size=16",
                  "train.grad_accum_steps=4", "train.recompute=none"], 2730)  # ModelLink 1.0 README


@pytest.mark.parametrize("name", sorted(MINDFORMERS_DP8))
def test_published_mindformers_dp8_runs_fit_and_their_throughput_is_below_the_bound(name):
    recipe = compose_recipe([f"experiment={name}"])
    planned = plan_recipe(recipe)
    assert recipe.parallel.data_parallel_degree == 8 and recipe.cluster.device_memory_gib == 64
    assert planned.memory.fits is True and planned.memory.total_bytes < 58 * GIB
    assert planned.time.tokens_per_s_per_device >= MINDFORMERS_DP8[name]
    peak = planned.time.peak_tflops * 1e12
    mfu = planned.time.tokens_per_s_per_device * flops_per_token(recipe.model, recipe.data.seq_len) / peak
    assert mfu <= 1.0 + 1e-9  # the bound is compute at the peak, at most


def test_the_modellink_tp8_run_is_below_the_bound_too():
    overrides, published = MODELLINK_TP8
    assert plan_recipe(compose_recipe(overrides)).time.tokens_per_s_per_device >= published


def test_an_ascend_recipe_on_cpu_gets_no_verdict_and_no_910b_mfu():
    recipe = compose_recipe(["experiment=llama3_8b_910b", "runtime=cpu"])
    planned = plan_recipe(recipe, with_suggestions=True)
    assert planned.memory.fits is None and not planned.suggestions and not planned.time.published
    text = format_plan(recipe, planned)
    assert "Ascend (910B) device memory only" in text and "no verdict off Ascend" in text
    assert "refuses this recipe" in text and "MFU at the declared peak" not in text


BASES = [["experiment=llama3_8b_910b", "parallel.zero_stage=0", "precision.param_dtype=bfloat16"],
         ["experiment=llama3_8b_910b", "train.recompute=none"],
         ["model=llama3_8b", "runtime=ascend", "precision=bf16", "attention=naive", "cluster=910b_1x8",
          "parallel=dp8", "data.seq_len=8192", "train.global_batch_size=8"]]


@pytest.mark.parametrize("base", BASES)
def test_every_printed_suggestion_passes_the_trainers_checks(base):
    from ascend_llm.cluster.preflight import preflight
    from ascend_llm.train.session import check_param_dtype

    planned = plan_recipe(compose_recipe(base), with_suggestions=True)
    assert planned.memory.fits is False and planned.suggestions
    for changes in planned.suggestions:
        recipe = compose_recipe(base + changes)
        preflight(recipe)  # validation, rank table, the memory check: raises ConfigError if refused
        check_param_dtype(recipe, "Ascend")  # the session's rule for bf16 parameters
