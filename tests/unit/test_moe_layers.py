"""MoE cells (models/moe.py) against float64 NumPy: both expert paths (tiled and all-experts) and their gradients,
routing, the load-balancing loss as transformers' load_balancing_loss_func computes it, the z-loss, parameter
counts, config checks, config.json round trips and LoRA on expert weights."""

from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from ascend_llm.config.lora import LoraConfig
from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import ConfigError
from ascend_llm.interop.hf_config import hf_config_from_model, model_config_from_hf
from ascend_llm.models.llama import build_model, count_params
from ascend_llm.models.lora import apply_lora, merged_weights
from ascend_llm.models.moe import all_experts, moe_aux_loss, route, tiled_experts, use_tiled

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)


@pytest.fixture(scope="module", autouse=True)
def pynative():
    """Small shapes, many of them: eager beats compiling a graph for each."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, ffn_hidden_dim=24, max_seq_len=32,
                num_experts=4, num_experts_per_tok=2, moe_ffn_hidden_dim=8, shared_expert_ffn_hidden_dim=12,
                qkv_bias=True, mlp_only_layers=[1], router_aux_loss_coef=0.02)
    return ModelConfig(**{**base, **kw})


def numpy_experts(x, weights, indices, w1, w3, w2) -> np.ndarray:
    """float64 reference: sum_j weights[n, j] * w2_e (silu(w1_e x) * w3_e x), e = indices[n, j]."""
    x, w1, w3, w2 = (np.asarray(a, np.float64) for a in (x, w1, w3, w2))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j, e in enumerate(indices[n]):
            g, u = w1[e] @ x[n], w3[e] @ x[n]
            out[n] += weights[n, j] * (w2[e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("tokens,experts,top_k", [(5, 4, 2), (96, 8, 2), (200, 6, 3)])
def test_both_expert_paths_equal_float64_and_each_other_with_gradients(tokens, experts, top_k):
    rng = np.random.default_rng(tokens)
    dim, hidden = 12, 10
    x = rng.normal(size=(tokens, dim)).astype(np.float32)
    w1, w3 = (rng.normal(0, 0.3, (experts, hidden, dim)).astype(np.float32) for _ in range(2))
    w2 = rng.normal(0, 0.3, (experts, dim, hidden)).astype(np.float32)
    logits = rng.normal(size=(tokens, experts)).astype(np.float32)
    if tokens > 100:  # an expert nobody picks, one that many pick: empty and multi-tile groups
        logits[:, 0] -= 50.0
        logits[:, 1] += 3.0
    _, weights, indices = route(Tensor(logits), top_k, True)
    ref = numpy_experts(x, weights.asnumpy(), indices.asnumpy(), w1, w3, w2)
    args = [Tensor(a) for a in (x, weights.asnumpy(), w1, w3, w2)]

    def run(fn):
        def f(x_, w_, a, b, c):
            return (fn(x_, w_, indices, a, b, c) * Tensor(np.linspace(-1, 1, dim, dtype=np.float32))).sum()
        out = fn(args[0], args[1], indices, *args[2:]).asnumpy()
        return out, [g.asnumpy() for g in ms.grad(f, grad_position=(0, 1, 2, 3, 4))(*args)]

    tiled, tiled_grads = run(tiled_experts)
    dense, dense_grads = run(all_experts)
    assert np.abs(tiled - ref).max() < 1e-5 and np.abs(dense - ref).max() < 1e-5
    for a, b in zip(tiled_grads, dense_grads):
        assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(b).max())
    assert use_tiled(tokens, top_k, experts) == (tokens > 50)  # which path the layer takes for these shapes


def test_routing_and_aux_loss_follow_transformers_formulas():
    rng = np.random.default_rng(0)
    layers, tokens, experts, k = 3, 40, 6, 2
    logits = rng.normal(size=(layers, tokens, experts)).astype(np.float32)
    counts, psum, zsum = np.zeros(experts), np.zeros(experts), 0.0
    for layer in range(layers):
        probs, weights, indices = (t.asnumpy() for t in route(Tensor(logits[layer]), k, False))
        p64 = np.exp(logits[layer].astype(np.float64))
        p64 /= p64.sum(-1, keepdims=True)
        top = np.argsort(-p64, -1)[:, :k]
        assert (indices == top).all() and np.abs(weights - np.take_along_axis(p64, top, -1)).max() < 1e-6
        counts += np.eye(experts)[top].sum((0, 1))
        psum += p64.sum(0)
        zsum += (np.log(np.exp(logits[layer].astype(np.float64)).sum(-1)) ** 2).sum()
    # transformers load_balancing_loss_func: E * sum_e mean(expert_mask)_e * mean(probs)_e over all layers' tokens
    n = layers * tokens
    aux = experts * np.sum(counts / n * psum / n)
    stats = Tensor(np.stack([counts, psum, np.full(experts, zsum / experts)]).astype(np.float32))
    assert abs(float(moe_aux_loss(stats, n, experts, 0.02, 0.0).asnumpy()) - 0.02 * aux) < 1e-7
    got = float(moe_aux_loss(stats, n, experts, 0.02, 1e-3).asnumpy())
    assert abs(got - (0.02 * aux + 1e-3 * zsum / n)) < 1e-6


def test_parameter_count_config_checks_and_config_json_round_trip():
    cfg = moe_cfg()
    model = build_model(cfg)
    assert count_params(cfg) == sum(p.size for p in model.get_parameters())
    assert [layer.is_sparse for layer in model.layers] == [True, False]
    with pytest.raises(ConfigError, match="model.num_experts_per_tok"):
        moe_cfg(num_experts_per_tok=5).validate()
    with pytest.raises(ConfigError, match="model.mlp_only_layers"):
        moe_cfg(mlp_only_layers=[2]).validate()
    with pytest.raises(ConfigError, match="model.moe_ffn_hidden_dim"):
        moe_cfg(moe_ffn_hidden_dim=0).validate()
    for cfg in (moe_cfg(), moe_cfg(qk_norm=True, qkv_bias=False, shared_expert_ffn_hidden_dim=0,
                                   norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[])):
        raw = hf_config_from_model(cfg, "fp32")
        assert raw["architectures"] == (["Qwen3MoeForCausalLM"] if cfg.qk_norm else ["Qwen2MoeForCausalLM"])
        back = model_config_from_hf(json.loads(json.dumps(raw)), name=cfg.name)
        assert back == cfg
    if FIXTURES is not None:  # the Hub key (num_experts) and the key transformers 5.25 writes (num_local_experts)
        raw = json.loads((FIXTURES / "qwen3_moe_tiny" / "config.json").read_text())
        assert model_config_from_hf(raw).num_experts == 8
        raw["num_experts"] = raw.pop("num_local_experts")
        assert model_config_from_hf(raw).num_experts == 8


def test_lora_on_expert_weights_trains_only_adapters_and_merges_exactly():
    cfg = moe_cfg()
    model = build_model(cfg, seed=1)
    model.return_aux_loss = False
    tokens = Tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32))
    before = model(tokens).asnumpy()
    apply_lora(model, LoraConfig(enabled=True, rank=2, alpha=4.0, targets=["wq", "w1", "w2", "w3"]))
    names = sorted(p.name for p in model.trainable_params())
    assert "layers.0.feed_forward.experts.w1.lora_a" in names and "layers.0.feed_forward.shared_expert.w1.lora_b" \
        in names and not any("router" in n for n in names)
    assert np.abs(model(tokens).asnumpy() - before).max() == 0  # B = 0: the adapters start as the identity
    rng = np.random.default_rng(2)
    for p in model.trainable_params():
        if p.name.endswith("lora_b"):
            p.set_data(Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    adapted = model(tokens).asnumpy()
    assert np.abs(adapted - before).max() > 1e-4
    plain = build_model(cfg, seed=1)
    plain.return_aux_loss = False
    merged = merged_weights(model)
    for p in plain.get_parameters():
        p.set_data(Tensor(merged[p.name]))
    assert np.abs(plain(tokens).asnumpy() - adapted).max() < 1e-5
    grads = ms.grad(lambda t: model(t).sum(), None, model.trainable_params())(tokens)
    assert all(ops.isfinite(g).all() for g in grads)


def test_planner_moe_terms_equal_the_real_parameter_bytes():
    """plan_memory.parameter_sizes (its sparse layers from plan_moe) equals the parameters a device really holds,
    in one process and with the experts sharded by parallel/ep.py (a group of 2, this process its rank 1)."""
    from ascend_llm.parallel.comm import Group
    from ascend_llm.parallel.ep import apply_expert_parallel
    from ascend_llm.parallel.plan_memory import parameter_sizes, parameters_per_device
    from ascend_llm.parallel.plan_moe import (
        all_to_all_bytes,
        expert_parameters_per_device,
        inactive_parameters_per_token,
    )
    from ascend_llm.parallel.plan_time import matmul_parameters

    cfg = moe_cfg(num_layers=3, mlp_only_layers=[1])
    model = build_model(cfg)
    real = sorted(p.size for p in model.get_parameters())
    assert sorted(parameter_sizes(cfg)) == real and parameters_per_device(cfg) == count_params(cfg)
    apply_expert_parallel(model, Group("ep_plan_test", (0, 1), 1))
    held = {p.name: p.size for p in model.get_parameters()}
    assert sorted(parameter_sizes(cfg, 1, 2)) == sorted(held.values())
    assert expert_parameters_per_device(cfg, 2) == sum(v for k, v in held.items() if ".experts." in k)
    experts = sum(v for k, v in held.items() if ".experts." in k) * 2  # all E experts
    inactive = experts * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
    assert inactive_parameters_per_token(cfg) == inactive
    assert matmul_parameters(cfg) == count_params(cfg) - cfg.vocab_size * cfg.dim - inactive
    # dispatch + combine, forward and backward: 2 sparse layers x (ep - 1) x n k rows x (2H + 1) values x e bytes
    assert all_to_all_bytes(cfg, 10, 2, 2) == 2 * 2 * 1 * 20 * (2 * cfg.dim + 1) * 2
    assert all_to_all_bytes(cfg, 10, 1, 2) == 0
    # capacity factor 1: chunks of ceil(1 x 20 / 2) = 10 rows instead of 20 (parallel/ep.py capacity_rows)
    assert all_to_all_bytes(cfg, 10, 2, 2, capacity_factor=1.0) == 2 * 2 * 1 * 10 * (2 * cfg.dim + 1) * 2


def test_precision_policy_sets_the_experts_gemm_dtype():
    """fp16 (a CPU GEMM dtype): the experts' batched matmuls run in float16 (logits move, within fp16 rounding);
    bf16 on CPU (emulated): the experts stay float32 (the policy logs them as kept)."""
    from ascend_llm.config.precision import PrecisionConfig
    from ascend_llm.precision.policy import apply_precision

    cfg = moe_cfg()
    tokens = Tensor(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 8)).astype(np.int32))
    reference = build_model(cfg, seed=4)
    reference.return_aux_loss = False
    want = reference(tokens).asnumpy()
    for name, dtype, expected in (("fp16", "float16", ms.float16), ("bf16", "bfloat16", None)):
        model = build_model(cfg, seed=4)
        model.return_aux_loss = False
        apply_precision(model, PrecisionConfig(name=name, compute_dtype=dtype))
        assert model.layers[0].feed_forward.experts.compute_dtype == expected
        if expected is not None:
            got = model(tokens).asnumpy()
            assert 0 < np.abs(got - want).max() < 2e-2


def test_expert_parallel_dispatch_in_one_process_and_its_capacity():
    """parallel/ep.py's dispatch and combine over a group of one (the exchange is the identity): dropless it equals
    the experts it wraps; with expert_capacity_factor 0.5 the pairs beyond ceil(0.5 P) in token order are dropped
    (float64 reference with their weights zeroed)."""
    from ascend_llm.models.moe import GroupedExperts
    from ascend_llm.parallel.comm import Group
    from ascend_llm.parallel.ep import ExpertParallelExperts, capacity_rows

    rng = np.random.default_rng(5)
    tokens, dim, hidden, experts, k = 12, 8, 6, 4, 2
    cell = GroupedExperts(experts, dim, hidden)
    for p in cell.get_parameters():
        p.set_data(Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    x = Tensor(rng.normal(size=(tokens, dim)).astype(np.float32))
    _, weights, indices = route(Tensor(rng.normal(size=(tokens, experts)).astype(np.float32)), k, False)
    one = Group("ep_one_process_test", (0,), 0)
    np.testing.assert_allclose(ExpertParallelExperts(cell, one, experts)(x, weights, indices).asnumpy(),
                               cell(x, weights, indices).asnumpy(), rtol=0, atol=1e-6)
    kept = capacity_rows(tokens * k, 1, 0.5)
    assert kept == tokens * k // 2
    dropped = weights.asnumpy().reshape(-1).copy()
    dropped[kept:] = 0.0
    ref = numpy_experts(x.asnumpy(), dropped.reshape(tokens, k), indices.asnumpy(),
                        *(getattr(cell, n).weight.asnumpy() for n in ("w1", "w3", "w2")))
    got = ExpertParallelExperts(cell, one, experts, capacity_factor=0.5)(x, weights, indices).asnumpy()
    assert np.abs(got - ref).max() < 1e-5


def test_zero_under_expert_parallel_shards_experts_over_their_expert_data_parallel_group():
    """ZeRO with expert parallel (parallel/zero.py), this process described as world rank 1 of dp4 x ep2 (EP group
    [0, 1], expert-data-parallel group [1, 3]): the layout check accepts it (context parallel stays refused); a
    layout-free optimizer state (the unsharded AdamW's names and shapes) loads as this rank's shards, checked
    against NumPy slicing: an expert moment keeps EP rank 1's experts, then expert-data-parallel rank 0's half
    of their elements; any other moment dp rank 1's quarter; the state bytes equal the planner's."""
    from ascend_llm.config.optim import OptimConfig
    from ascend_llm.config.parallel import ParallelConfig, check_expert_parallel
    from ascend_llm.parallel.comm import Group
    from ascend_llm.parallel.ep import apply_expert_parallel, ep_group_ranks
    from ascend_llm.parallel.plan_memory import sharded_elements
    from ascend_llm.parallel.zero import ZeroAdamW, owned_range

    cfg = moe_cfg(num_layers=3, mlp_only_layers=[1])
    check_expert_parallel(ParallelConfig(data_parallel_degree=4, expert_parallel_degree=2, zero_stage=2), cfg)
    with pytest.raises(ConfigError, match="^parallel.expert_parallel_degree.*context_parallel"):
        check_expert_parallel(ParallelConfig(data_parallel_degree=4, expert_parallel_degree=2,
                                             context_parallel_degree=2), cfg)
    ep_ranks, edp_ranks = ep_group_ranks([0, 1, 2, 3], 1, 2)
    assert (ep_ranks, edp_ranks) == ([0, 1], [1, 3])
    model = build_model(cfg)
    full_shapes = {p.name: tuple(p.shape) for p in model.trainable_params()}
    ep, edp = Group("ep_zero_test", (0, 1), 1), Group("edp_zero_test", (1, 3), 0)
    apply_expert_parallel(model, ep)
    params = model.trainable_params()
    opt = ZeroAdamW(params, OptimConfig(), 2, group=Group("dp_zero_test", (0, 1, 2, 3), 1), grad_scale=0.25,
                    expert_groups=(edp, ep))
    assert opt.state_bytes() == sharded_elements(cfg, 1, 4, True, 2) * 8 + 4
    rng = np.random.default_rng(0)
    state = {"adam_step": np.array(3, np.int32)}
    for prefix in ("adam_m.", "adam_v."):
        state.update({prefix + n: rng.standard_normal(s).astype(np.float32) for n, s in full_shapes.items()})
    opt.load_full_state_dict(state)
    assert int(opt.step.asnumpy()) == 3
    experts = 0
    for i, p in enumerate(params):
        full = state["adam_m." + p.name]
        if ".experts." in p.name:
            experts += 1
            rows = full.shape[0] // 2
            local, (size, rank) = full[rows:2 * rows].reshape(-1), (2, 0)  # EP rank 1, then edp rank 0 of 2
        else:
            local, (size, rank) = full.reshape(-1), (4, 1)
        start, stop = owned_range(local.size, size, rank)
        got = opt.exp_avg[i].asnumpy()
        assert got.size == -(-local.size // size), p.name
        np.testing.assert_array_equal(got[:stop - start], local[start:stop], err_msg=p.name)
        assert opt.full_shape(i) == full_shapes[p.name]
    assert experts == 3 * 2  # w1, w2, w3 of 2 sparse layers
