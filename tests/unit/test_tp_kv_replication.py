"""KV-head replication under tensor parallel and ZeRO under TP/CP, without msrun: the layout validation, the
replication bookkeeping (which rows each rank keeps, names and shapes, layout-free gather/shard), the gradient
routing of ReplicatedKV, the clipping-norm weights, ZeRO's group in build_optimizer and the memory planner's
count of replicated KV weights. Multi-process numerics: tests/integration/test_tpz_msrun.py."""

from __future__ import annotations

import numpy as np
import pytest

from ascend_llm.config.model import ModelConfig
from ascend_llm.config.parallel import ParallelConfig, check_parallel_model
from ascend_llm.errors import ConfigError

DEBUG_KV1 = ModelConfig(name="debug", vocab_size=512, dim=64, num_layers=1, num_heads=4, num_kv_heads=1,
                        ffn_hidden_dim=176, max_seq_len=64)


@pytest.mark.parametrize("heads,kv,tp", [(4, 1, 2), (4, 1, 4), (4, 2, 4), (32, 8, 16), (32, 8, 8), (32, 8, 2)])
def test_tp_may_divide_the_kv_heads_or_be_a_multiple_of_them(heads, kv, tp):
    model = ModelConfig(dim=heads * 16, num_heads=heads, num_kv_heads=kv, ffn_hidden_dim=64 * tp)
    check_parallel_model(ParallelConfig(tensor_parallel_degree=tp), model, 64)


def test_kv_heads_neither_divisible_nor_a_divisor_is_one_line_naming_the_field():
    model = ModelConfig(dim=96, num_heads=6, num_kv_heads=3, ffn_hidden_dim=176)
    with pytest.raises(ConfigError) as err:
        check_parallel_model(ParallelConfig(tensor_parallel_degree=2), model, 16)
    text = str(err.value)
    assert text.startswith("parallel.tensor_parallel_degree") and "num_kv_heads=3" in text and "\n" not in text


def test_zero_needs_two_ranks_holding_identical_parameters():
    ParallelConfig(context_parallel_degree=2, zero_stage=1).validate()  # dp x cp = 2: Megatron's dp-cp group
    ParallelConfig(data_parallel_degree=2, tensor_parallel_degree=2, zero_stage=2).validate()
    with pytest.raises(ConfigError, match=r"^parallel.zero_stage.*data_parallel_degree \* context_parallel"):
        ParallelConfig(tensor_parallel_degree=2, zero_stage=1).validate()


def test_replica_blocks_are_consecutive_tp_ranks():
    from ascend_llm.parallel.tp import kv_replica_ranks, kv_replicas

    assert [kv_replicas(kv, tp) for kv, tp in ((1, 2), (2, 4), (8, 16), (8, 8), (8, 2))] == [2, 2, 2, 1, 1]
    world = (4, 5, 6, 7)  # the TP group of some data-parallel replica
    assert [kv_replica_ranks(world, t, 2) for t in range(4)] == [(4, 5), (4, 5), (6, 7), (6, 7)]
    assert kv_replica_ranks(world, 3, 4) == world


def fake_groups(tp_rank: int, tp: int, dp_cp_size: int = 1):
    """ParallelGroups of TP rank `tp_rank` without communication (only bookkeeping and arithmetic run)."""
    from ascend_llm.parallel.comm import Group
    from ascend_llm.parallel.dims import ParallelGroups

    one = Group("one", (tp_rank,), 0)
    dp_cp = Group("dp_cp", tuple(range(dp_cp_size)), 0) if dp_cp_size > 1 else one
    return ParallelGroups(rank=tp_rank, dp=one, cp=one, tp=Group("tp", tuple(range(tp)), tp_rank), dp_cp=dp_cp)


def test_each_rank_keeps_the_kv_head_of_its_query_heads_and_names_and_full_shapes_stay():
    from ascend_llm.models.llama import build_model
    from ascend_llm.parallel.tp import _one_replica, apply_tensor_parallel, shard_full, tp_replicas, tp_shard_axes

    full_model = build_model(DEBUG_KV1, seed=0)
    full = {p.name: p.asnumpy() for p in full_model.trainable_params()}
    shards = []
    for rank in (0, 1):
        model = apply_tensor_parallel(build_model(DEBUG_KV1, seed=0), ParallelConfig(tensor_parallel_degree=2),
                                      fake_groups(rank, 2), seq_len=16)
        params = {p.name: p for p in model.trainable_params()}
        assert list(params) == list(full)  # the unsharded model's names, in its order
        wk = params["layers.0.attention.wk.weight"]
        assert wk.shape == (16, 64) and wk.tp_replicas == 2 and wk.tp_full_shape == (16, 64)
        np.testing.assert_array_equal(wk.asnumpy(), full["layers.0.attention.wk.weight"])  # the one KV head
        wq = params["layers.0.attention.wq.weight"].asnumpy()
        np.testing.assert_array_equal(wq, full["layers.0.attention.wq.weight"][rank * 32:(rank + 1) * 32])
        attention = model.layers[0].attention
        assert (attention.num_heads, attention.num_kv_heads) == (2, 1)
        assert tp_replicas(model) == {f"layers.0.attention.{w}.weight": 2 for w in ("wk", "wv")}
        mine = shard_full(full, tp_shard_axes(model), rank, 2, tp_replicas(model))
        for name, p in params.items():
            np.testing.assert_array_equal(mine[name], p.asnumpy(), err_msg=name)
        shards.append(mine)
    for name in ("layers.0.attention.wk.weight", "layers.0.attention.wv.weight"):
        both = np.concatenate([shards[0][name], shards[1][name]], 0)  # what the TP all-gather returns
        np.testing.assert_array_equal(_one_replica(both, 0, 2, 2), full[name])


def test_tp4_with_two_kv_heads_keeps_head_rank_div_2():
    from mindspore import Tensor, nn

    from ascend_llm.parallel.comm import Group
    from ascend_llm.parallel.tp import _one_replica, shard_full, shard_replicated_kv

    full = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 KV heads of head_dim 8, input width 3
    gathered = []
    for rank in range(4):
        cell = nn.Dense(3, 16, has_bias=False)
        cell.weight.set_data(Tensor(full))
        shard_replicated_kv(cell, Group("tp", (0, 1, 2, 3), rank), num_kv_heads=2)
        head = rank // 2
        np.testing.assert_array_equal(cell.weight.asnumpy(), full[head * 8:(head + 1) * 8])
        assert cell.weight.tp_replicas == 2 and cell.out_channels == 8
        got = shard_full({"w": full}, {"w": 0}, rank, 4, {"w": 2})["w"]
        np.testing.assert_array_equal(got, full[head * 8:(head + 1) * 8])
        gathered.append(got)
    np.testing.assert_array_equal(_one_replica(np.concatenate(gathered, 0), 0, 2, 4), full)


def test_replicated_kv_routes_gradients_as_r_equal_replicas_would():
    """One process standing in for R = 2 replicas that receive equal output gradients: the output sum over the
    replicas replaced by its value for equal inputs (x2), the input gradient scaled by 1/2. Every gradient must
    equal the unreplicated model's, and wk/wv get twice theirs (the sum over the two replicas). This also
    guards the MindSpore graph-mode behaviour that ScaleGrad works around (tp.ScaleGrad's doc)."""
    import mindspore as ms
    from mindspore import Tensor, ops

    from ascend_llm.models.llama import build_model
    from ascend_llm.parallel.comm import Group
    from ascend_llm.parallel.tp import ReplicatedKV, ScaleGrad

    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(3)
    tokens = Tensor(rng.integers(0, 512, size=(2, 16)).astype(np.int32))
    labels = Tensor(rng.integers(0, 512, size=(2, 16)).astype(np.int32))

    def grads(replicate: bool) -> dict[str, np.ndarray]:
        model = build_model(DEBUG_KV1, seed=0)
        if replicate:
            attention = model.layers[0].attention
            for name in ("wk", "wv"):
                cell = ReplicatedKV(getattr(attention, name), Group("one", (0,), 0))
                cell.scale_input, cell.sum_output = ScaleGrad(0.5), ScaleGrad(2.0)
                setattr(attention, name, cell)
            for name, p in model.parameters_and_names():
                p.name = name
        params = model.trainable_params()

        def forward(x, y):
            return ops.cross_entropy(model(x).reshape(-1, 512), y.reshape(-1))

        _, out = ms.jit(ms.value_and_grad(forward, None, params))(tokens, labels)
        return {p.name: g.asnumpy() for p, g in zip(params, out)}

    plain, replicated = grads(False), grads(True)
    assert plain.keys() == replicated.keys()
    for name, want in plain.items():
        factor = 2.0 if name.endswith(("wk.weight", "wv.weight")) else 1.0
        np.testing.assert_allclose(replicated[name], factor * want, rtol=1e-5, atol=1e-8, err_msg=name)


def test_norm_weights_count_each_kv_replica_once():
    from mindspore import Parameter, Tensor

    from ascend_llm.parallel.tp import sharded_norm_weights

    params = [Parameter(Tensor(np.zeros(2, np.float32)), name=n) for n in ("norm", "wq", "wk")]
    params[1].tp_axis = 0
    params[2].tp_axis, params[2].tp_replicas = 0, 4
    assert sharded_norm_weights(params) == (0.0, 1.0, 0.25)


def test_zero_under_cp_shards_over_the_dp_cp_group_with_the_trainers_scale():
    from mindspore import Parameter, Tensor

    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.session import build_optimizer

    recipe = compose_recipe(["model=debug", "cluster=cpu_4proc", "parallel=cp2_dp2", "parallel.zero_stage=2"])
    groups = fake_groups(0, 1, dp_cp_size=4)
    params = [Parameter(Tensor(np.ones((2, 3), np.float32)), name="w.weight")]
    optimizer = build_optimizer(params, recipe, groups)
    # sum over the 4 dp x cp ranks, times 1/dp = 1/2 (the CP ranks hold shares of one loss)
    assert optimizer.group is groups.dp_cp and optimizer.size == 4 and optimizer.grad_scale == 0.5
    assert optimizer.chunks == (2,)  # ceil(6 / 4)
    with pytest.raises(ValueError, match="ParallelGroups"):
        build_optimizer(params, recipe)


def test_planner_counts_one_replicated_kv_head_per_rank_and_shards_zero_over_dp_cp():
    from ascend_llm.models.llama import build_model
    from ascend_llm.parallel.plan_memory import Layout, model_state_terms, parameter_sizes
    from ascend_llm.parallel.tp import apply_tensor_parallel

    model = apply_tensor_parallel(build_model(DEBUG_KV1, seed=0), ParallelConfig(tensor_parallel_degree=2),
                                  fake_groups(1, 2), seq_len=16)
    held = [int(np.prod(p.shape)) for p in model.trainable_params()]  # what a TP rank really holds
    assert sorted(parameter_sizes(DEBUG_KV1, 2)) == sorted(held)
    # Llama-3 8B at tp 16: 8 KV heads, so each rank holds one replicated head of wk and wv (128 x 4096 each)
    llama = ModelConfig(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        ffn_hidden_dim=14336)
    assert parameter_sizes(llama, 16)[1:7] == [4096, 4096 * 256, 4096 * 128, 4096 * 128, 256 * 4096, 4096]
    lay = Layout(model=DEBUG_KV1, seq_len=16, micro_batch=1, grad_accum_steps=1, data_parallel_degree=2,
                 tensor_parallel_degree=2, context_parallel_degree=2, zero_stage=1, world_size=8)
    state = next(t for t in model_state_terms(lay) if t.name.startswith("optimizer state"))
    assert state.bytes == 8 * sum(-(-n // 4) for n in held) + 4  # m and v of ceil(n / (dp*cp)) per tensor


def test_bf16_parameters_with_tensor_parallel_need_zero_for_master_weights():
    from ascend_llm.compose import compose_recipe
    from ascend_llm.train.session import check_param_dtype

    base = ["model=debug", "cluster=cpu_4proc", "parallel=tp2_dp2", "precision.param_dtype=bfloat16"]
    check_param_dtype(compose_recipe([*base, "parallel.zero_stage=1"]), "Ascend")  # ZeRO keeps fp32 masters
    with pytest.raises(ConfigError, match="^precision.param_dtype.*zero_stage"):
        check_param_dtype(compose_recipe([*base, "parallel.zero_stage=0"]), "Ascend")
    with pytest.raises(ConfigError, match="Ascend only"):
        check_param_dtype(compose_recipe([*base, "parallel.zero_stage=1"]), "CPU")
