"""Memory/time planner: hand-computed terms, published totals, monotonicity, suggestions that fit, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.errors import ConfigError
from ascend_llm.parallel.plan import check_fits, plan_recipe, suggest

GIB = 2**30
OLD_8B = ["experiment=llama3_8b_910b", "precision=fp32", "precision.param_dtype=float32", "attention=naive",
          "parallel=dp8", "train.recompute=none", "data.seq_len=8192"]
SHIPPED_910B = ["llama3_8b_910b", "llama3_8b_8k_910b", "llama2_7b_910b_2x8", "qwen2_7b_910b", "qwen3_30b_a3b_910b"]


def terms(overrides):
    return {t.name: t.bytes for t in plan_recipe(compose_recipe(overrides)).memory.terms}


def test_debug_model_terms_by_hand():
    # debug: vocab 512, dim 64, 2 layers, 4 heads, 2 kv heads (head_dim 16), ffn 176; fp32; naive attention.
    # micro-batch = 8 rows / 2 accumulation steps = 4 rows of 64 tokens -> 256 tokens.
    planned = plan_recipe(compose_recipe(["model=debug", "data.seq_len=64", "train.global_batch_size=8",
                                          "train.grad_accum_steps=2", "attention=naive"])).memory
    got = {t.name: t.bytes for t in planned.terms}
    layer = 64 * 16 * (4 + 2 * 2) + 4 * 16 * 64 + 3 * 64 * 176 + 2 * 64  # 46208
    params = 2 * layer + 64 + 2 * 512 * 64  # 158016
    assert params == 158016
    assert got["parameters"] == params * 4
    assert got["gradients"] == params * 4
    assert got["grad accumulation buffer"] == params * 4
    assert got["accumulation: gradients and new sum"] == 2 * params * 4
    assert got["optimizer state (AdamW m, v)"] == params * 8 + 4
    assert "fp32 master weights" not in got
    tokens = 256
    # norm inputs, norm outputs, q/k/v, wo input, SwiGLU: naive keeps no s x s tensor (NaiveAttentionKernel)
    per_layer = (2 * 4 * 64 + 2 * 4 * 64 + 4 * (64 + 2 * 32) + 4 * 64 + 4 * 4 * 176) * tokens
    assert got["activations: 2 layers (naive attention)"] == 2 * per_layer
    assert got["naive attention: keep mask"] == tokens * 64
    working = (4 * 4 + 4) * 4 * 64 * tokens  # 4 float32 + 1 activation-dtype (B, H, S, S) of one layer
    assert got["naive attention: one layer's s x s working set"] == working
    assert got["logits and their gradient (fp32)"] == 2 * 4 * 512 * tokens
    assert got["activations: the last layer in its backward"] == per_layer + working
    assert got["update: gradients and optimizer temporaries"] == params * 4 + 16 * 512 * 64
    always = params * (4 + 8 + 4) + 4  # parameters, m and v, accumulation buffer; step counter
    start = 2 * per_layer + tokens * 64 + working + 2 * 4 * 512 * tokens
    assert planned.peak_phase == "backward start" and planned.phase_bytes("backward start") == start
    assert got["fragmentation headroom"] == pytest.approx(0.10 * (always + start))
    assert planned.total_bytes == pytest.approx(1.1 * (always + start))
    assert "communication buffers" not in got  # CPU recipe: no HCCL buffers
    assert planned.fits is None and "Ascend (910B) device memory only" in planned.notes[0]


def test_full_recompute_and_segmented_terms_by_hand():
    got = terms(["model=debug", "data.seq_len=64", "train.global_batch_size=8", "train.recompute=full",
                 "attention=segmented"])
    tokens = 8 * 64
    assert got["activations: layer inputs (full recompute)"] == 2 * 4 * 64 * tokens
    # norm inputs, norm outputs, q/k/v, kernel output, log-sum-exp, wo input, SwiGLU (float32 on CPU)
    one_layer = (2 * 4 * 64 + 2 * 4 * 64 + 4 * (64 + 2 * 32) + 4 * 64 + 4 * 4 + 4 * 64 + 4 * 4 * 176) * tokens
    assert got["activations: one layer recomputed"] == one_layer


def test_hccl_buffers_on_ascend():
    got = terms(["experiment=llama3_8b_910b", "cluster.hccl.buffsize_mb=100"])
    assert got["communication buffers"] == 1 * 2 * 100 * 2**20  # world group only (dp == world)


@pytest.fixture
def pynative_mode():
    """Eager: the test reads the sizes and dtypes of the gradients, which do not depend on the mode (a graph
    compile per model was most of its time)."""
    ms = pytest.importorskip("mindspore")
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=mode)


@pytest.mark.parametrize("model", ["debug", "tiny"])
def test_state_terms_equal_the_trainers_parameters(model, pynative_mode):
    ms = pytest.importorskip("mindspore")
    from ascend_llm.optim.adamw import AdamW
    from ascend_llm.train.build import build_training_model

    recipe = compose_recipe([f"model={model}", "train.grad_accum_steps=2"])
    net = build_training_model(recipe)
    params = net.trainable_params()
    optimizer = AdamW(params, recipe.optim)
    nbytes = {p.name: p.size * ms.dtype_to_nptype(p.dtype)().itemsize for p in params}
    opt_bytes = sum(p.size * ms.dtype_to_nptype(p.dtype)().itemsize for p in optimizer.state_parameters())
    got = {t.name: t.bytes for t in plan_recipe(recipe).memory.terms}
    from ascend_llm.parallel.plan_memory import parameter_sizes

    assert parameter_sizes(recipe.model) == [p.size for p in params]  # tensor by tensor, in order
    assert got["parameters"] == sum(nbytes.values())
    x = ms.Tensor(np.zeros((2, 16), np.int32))

    def forward(tokens):
        return net(tokens).mean()

    grads = ms.value_and_grad(forward, None, params)(x)[1]
    assert got["gradients"] == sum(g.size * ms.dtype_to_nptype(g.dtype)().itemsize for g in grads)
    assert got["optimizer state (AdamW m, v)"] == opt_bytes


def state_bytes_per_param(stage, dp):
    got = terms(["experiment=llama3_8b_910b", f"parallel.data_parallel_degree={dp}", f"parallel.zero_stage={stage}",
                 "cluster.num_workers_per_node=" + str(dp), f"train.global_batch_size={8 * dp}",
                 "train.grad_accum_steps=1"])
    params = 8_030_261_248
    names = ("parameters", "gradients", "fp32 master weights", "optimizer state (AdamW m, v)")
    return sum(got[n] for n in names) / params


def test_mixed_precision_adam_is_16_bytes_per_parameter():
    # ZeRO paper sec. 3.1: 2 (bf16/fp16 params) + 2 (grads) + 12 (fp32 master, m, v) = 16 bytes per parameter.
    assert state_bytes_per_param(0, 8) == pytest.approx(16.0, abs=1e-6)


def test_zero1_matches_the_papers_7_5b_example():
    # ZeRO paper fig. 1: 7.5B parameters, Nd=64: baseline 120 GB, stage 1 (P_os) 31.4 GB.
    assert state_bytes_per_param(1, 64) * 7.5e9 / 1e9 == pytest.approx(31.4, abs=0.05)
    assert state_bytes_per_param(0, 64) * 7.5e9 / 1e9 == pytest.approx(120.0, abs=0.05)


def test_monotone_in_sharding_recompute_sequence_and_micro_batch():
    base = ["experiment=llama3_8b_910b"]

    def total(extra):
        return plan_recipe(compose_recipe(base + extra)).memory.total_bytes

    assert total(["parallel.zero_stage=0"]) > total(["parallel.zero_stage=1"]) > total(["parallel.zero_stage=2"])
    assert (total(["train.recompute=none"]) > total(["train.recompute=selective"])
            > total(["train.recompute=full"]))
    naive = ["attention=naive"]  # NaiveAttentionKernel keeps nothing selective recompute could drop
    assert total(naive + ["train.recompute=none"]) == total(naive + ["train.recompute=selective"])
    assert total(naive + ["train.recompute=none"]) > total(naive + ["train.recompute=full"])
    assert total(["data.seq_len=2048"]) < total([]) < total(["data.seq_len=8192"])
    assert total(["train.grad_accum_steps=4"]) > total([])  # micro-batch 2 instead of 1
    assert total(["precision.param_dtype=float32"]) > total([])


def test_the_old_pure_dp_fp32_8b_layout_is_refused():
    recipe = compose_recipe(OLD_8B)
    planned = plan_recipe(recipe)
    assert planned.memory.fits is False and planned.memory.total_bytes > 2 * 64 * GIB
    with pytest.raises(ConfigError) as info:
        check_fits(recipe)
    assert "GiB" in str(info.value) and "exceeds" in str(info.value)
    recipe.train.memory_check = False
    check_fits(recipe)  # the skip switch


@pytest.mark.parametrize("name", SHIPPED_910B)
def test_shipped_910b_recipes_fit(name):
    recipe = compose_recipe([f"experiment={name}"])
    planned = plan_recipe(recipe)
    assert planned.memory.fits is True and planned.memory.shortfall_bytes < -2 * GIB
    check_fits(recipe)


@pytest.mark.parametrize("extra", [["parallel.zero_stage=0", "precision.param_dtype=float32"],
                                   ["train.recompute=none", "attention=naive", "parallel.zero_stage=1"],
                                   ["data.seq_len=8192", "parallel.zero_stage=1"],
                                   ["train.recompute=none", "train.grad_accum_steps=2"]])
def test_suggestions_fit_when_re_planned(extra):
    overrides = ["experiment=llama3_8b_910b", *extra]
    recipe = compose_recipe(overrides)
    assert plan_recipe(recipe).memory.fits is False
    found = suggest(recipe)
    assert found
    if extra == ["data.seq_len=8192", "parallel.zero_stage=1"]:  # ZeRO-1's accumulation holds 3 gradient sets
        assert ["parallel.zero_stage=2"] in found
    for changes in found:
        assert plan_recipe(compose_recipe(overrides + changes)).memory.fits is True
        # at most 4 knobs (a tensor-parallel move sets tp, dp and sequence_parallel together)
        knobs = [c for c in changes if not c.startswith(("parallel.data_parallel_degree=", "parallel.sequence_p"))]
        assert len(knobs) <= 4


def test_cli_refuses_with_exit_2_and_prints_json():
    run = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "plan", *OLD_8B],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "memory per device" in run.stderr
    assert "DOES NOT FIT" in run.stdout and "naive attention: one layer's s x s working set" in run.stdout
    ok = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "plan", "experiment=llama3_8b_910b", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["fits"] is True and data["time"]["published"] and data["time"]["tokens_per_s_per_device"] > 0


def test_time_estimate_by_hand():
    recipe = compose_recipe(["experiment=llama3_8b_910b", "cluster.intra_node_gb_per_s=100"])
    planned = plan_recipe(recipe)
    params = 8_030_261_248
    matmul = params - 128256 * 4096  # the input embedding is a lookup, not a GEMM
    per_token = 6 * matmul + 12 * 32 * 4096 * 4096 + 2 * matmul + 4 * 32 * 4096 * 4096  # full recompute
    tokens = 64 * 4096
    assert planned.time.compute_s == pytest.approx(tokens / 8 * per_token / 354e12)
    # ZeRO-2, 8 micro-batches: 8 gradient reduce-scatters + 1 parameter all-gather, each 7/8 of the bf16 bytes
    assert sum(planned.time.comm_s.values()) == pytest.approx(9 * 7 / 8 * params * 2 / 100e9)


def test_context_parallel_gradients_are_reduced_over_data_times_context_ranks():
    """cp4 x dp2 on 8 NPUs: the gradient all-reduce spans the 8 ranks holding the same parameters (2 passes of
    7/8 of the bf16 bytes), and the K/V all-gather 3/4 of a layer's K and V per pass, twice per layer."""
    recipe = compose_recipe(["experiment=llama3_8b_910b", "cluster.intra_node_gb_per_s=100", "parallel.zero_stage=0",
                             "parallel.context_parallel_degree=4", "parallel.data_parallel_degree=2",
                             "train.grad_accum_steps=1", "train.global_batch_size=2", "data.seq_len=8192"])
    comm = plan_recipe(recipe).time.comm_s
    assert comm["data parallel (gradients)"] == pytest.approx(2 * 7 / 8 * 8_030_261_248 * 2 / 100e9)
    kv_bytes = 2 * 8 * 128 * 1 * 8192 * 2  # k and v, 8 KV heads x 128, one sequence, bf16
    assert comm["context parallel (k, v)"] == pytest.approx(32 * 2 * 3 / 4 * kv_bytes / 100e9)


@pytest.mark.parametrize("overrides, field", [
    (["parallel=dp2"], "parallel.data_parallel_degree"),  # 2 does not match the 1-process cluster
    (["parallel.zero_stage=1"], "parallel.zero_stage"),  # no data parallelism to shard over
    (["parallel.zero_stage=3"], "parallel.zero_stage"),
    (["train.recompute=partial"], "train.recompute"),
    (["cluster.device_memory_gib=0"], "cluster.device_memory_gib"),
    (["precision.param_dtype=float16"], "precision.param_dtype"),
    (["experiment=llama3_8b_910b", "runtime.max_device_memory=58G"], "runtime.max_device_memory"),
])
def test_bad_combinations_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        plan_recipe(compose_recipe(overrides))
    assert info.value.field == field


def test_info_prints_the_per_device_footprint_against_the_budget(capsys):
    from ascend_llm.cli.info import main

    assert main(OLD_8B) == 0
    out = capsys.readouterr().out
    total = plan_recipe(compose_recipe(OLD_8B)).memory.total_bytes / GIB
    assert f"{total:.4g}" in out and "NO (see ascend-llm plan)" in out
    assert main(["experiment=llama3_8b_910b"]) == 0
    assert "fits_on_device               yes" in capsys.readouterr().out


def test_lora_terms_count_the_trainers_adapters_and_a_7b_lora_fits_one_910b():
    from ascend_llm.models import build_model
    from ascend_llm.models.lora import apply_lora
    from ascend_llm.parallel.plan import layout_of, plan_recipe
    from ascend_llm.parallel.plan_memory import lora_sizes

    recipe = compose_recipe(["model=debug", "lora.enabled=true", "lora.rank=4", "lora.targets=[wq,wv,w2]"])
    model = build_model(recipe.model)
    apply_lora(model, recipe.lora)
    trainable = sum(int(np.prod(p.shape)) for p in model.trainable_params())
    lay = layout_of(recipe)
    assert sum(lora_sizes(lay.model, lay.lora_rank, lay.lora_targets)) == trainable
    seven_b = compose_recipe(["model=llama2_7b", "cluster=910b_1x8", "cluster.num_workers_per_node=1",
                              "lora.enabled=true", "runtime=ascend", "attention=fused", "train.recompute=full",
                              "train.global_batch_size=1", "data.seq_len=2048", "precision=bf16"])
    assert plan_recipe(seven_b).memory.fits is True
    full = compose_recipe(["model=llama2_7b", "cluster=910b_1x8", "cluster.num_workers_per_node=1",
                           "runtime=ascend", "attention=fused", "train.recompute=full", "train.global_batch_size=1",
                           "data.seq_len=2048", "precision=bf16"])
    assert plan_recipe(full).memory.fits is False  # the same model fully fine-tuned does not
