"""Layout, groups, zigzag split, shard/gather maps and the TP/CP config checks (single process, no
collectives). The multi-process behaviour is in tests/integration/test_tpcp_msrun.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ascend_llm.config.model import ModelConfig
from ascend_llm.config.parallel import ClusterConfig, ParallelConfig, check_parallel_model, check_world_size
from ascend_llm.errors import ConfigError
from ascend_llm.parallel import dims
from ascend_llm.parallel.cp import gathered_order, shard_sequence, zigzag_positions
from ascend_llm.parallel.tp import padded_vocab, shard_full

P222 = ParallelConfig(data_parallel_degree=2, context_parallel_degree=2, tensor_parallel_degree=2)


def test_rank_coordinates_put_tp_innermost():
    # rank = (dp * C + cp) * T + tp, written out for every rank of a 2x2x2 layout
    for d, c, t in itertools.product(range(2), repeat=3):
        coords = dims.rank_coordinates((d * 2 + c) * 2 + t, P222)
        assert coords == {"data_parallel_degree": d, "context_parallel_degree": c, "tensor_parallel_degree": t}


def test_axis_groups_partition_the_world():
    world = range(P222.world_size)
    for axis, varying in (("tp", {2}), ("cp", {1}), ("dp", {0}), ("dp_cp", {0, 1})):
        groups = {tuple(dims.axis_ranks(P222, r, axis)) for r in world}
        assert sorted(r for g in groups for r in g) == list(world)  # every rank in exactly one group
        for group in groups:
            coords = [(r // 4, r // 2 % 2, r % 2) for r in group]
            fixed = [i for i in range(3) if i not in varying]
            assert len({tuple(c[i] for i in fixed) for c in coords}) == 1
            assert len(group) == int(np.prod([(2, 2, 2)[i] for i in varying]))
    assert dims.axis_ranks(P222, 5, "tp") == [4, 5]
    assert dims.axis_ranks(P222, 5, "cp") == [5, 7]
    assert dims.axis_ranks(P222, 5, "dp") == [1, 5]
    assert dims.axis_ranks(P222, 5, "dp_cp") == [1, 3, 5, 7]
    with pytest.raises(ConfigError, match="axis"):
        dims.axis_ranks(P222, 0, "pp")


def test_describe_layout_lists_every_rank():
    lines = dims.describe_layout(ParallelConfig(data_parallel_degree=2, tensor_parallel_degree=2))
    assert lines == ["rank 0: dp=0 cp=0 tp=0", "rank 1: dp=0 cp=0 tp=1", "rank 2: dp=1 cp=0 tp=0",
                     "rank 3: dp=1 cp=0 tp=1"]


def test_world_size_must_match_cluster():
    cluster = ClusterConfig(num_workers_per_node=2)
    assert check_world_size(ParallelConfig(tensor_parallel_degree=2), cluster) == 2
    with pytest.raises(ConfigError, match="world size"):
        check_world_size(ParallelConfig(tensor_parallel_degree=2, context_parallel_degree=2), cluster)


DEBUG = ModelConfig(vocab_size=511, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=176)


@pytest.mark.parametrize("overrides,model,seq_len,field", [
    (dict(tensor_parallel_degree=3), DEBUG, 16, "parallel.tensor_parallel_degree"),  # heads 4
    (dict(tensor_parallel_degree=2), ModelConfig(dim=96, num_heads=6, num_kv_heads=3, ffn_hidden_dim=176), 16,
     "parallel.tensor_parallel_degree"),  # kv heads 3: neither divides the other
    (dict(tensor_parallel_degree=2), ModelConfig(dim=64, num_heads=4, num_kv_heads=2, ffn_hidden_dim=175), 16,
     "parallel.tensor_parallel_degree"),
    (dict(context_parallel_degree=2), DEBUG, 18, "data.seq_len"),  # 18 % 4
    (dict(tensor_parallel_degree=2, sequence_parallel=True), DEBUG, 7, "parallel.sequence_parallel"),
])
def test_bad_layouts_name_the_field(overrides, model, seq_len, field):
    with pytest.raises(ConfigError) as err:
        check_parallel_model(ParallelConfig(**overrides), model, seq_len)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_good_layouts_pass_and_vocab_needs_no_divisibility():
    for overrides in (dict(tensor_parallel_degree=2), dict(context_parallel_degree=2),
                      dict(tensor_parallel_degree=2, context_parallel_degree=2)):
        check_parallel_model(ParallelConfig(**overrides), DEBUG, 16)  # vocab 511 is padded, not rejected
    with pytest.raises(ConfigError, match="sequence_parallel"):
        ParallelConfig(sequence_parallel="yes").validate()


def test_zigzag_split_is_balanced_and_invertible():
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    for cp, seq in ((2, 16), (4, 32)):
        parts = [zigzag_positions(seq, cp, r) for r in range(cp)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(seq))
        # causal work of a rank = sum over its query positions of (position + 1): equal on every rank
        assert len({int((p + 1).sum()) for p in parts}) == 1
        gathered = np.concatenate(parts)
        assert (gathered[gathered_order(seq, cp)] == np.arange(seq)).all()
    x = np.arange(2 * 8 * 3).reshape(2, 8, 3)
    assert (shard_sequence(x, 2, 1) == x[:, [2, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match="seq_len"):
        zigzag_positions(10, 2, 0)


def test_shard_full_pads_vocab_and_concatenates_back():
    rng = np.random.default_rng(0)
    full = {"tok_embeddings.weight": rng.standard_normal((5, 3)), "layers.0.attention.wo.weight":
            rng.standard_normal((4, 6)), "norm.weight": rng.standard_normal(3)}
    axes = {"tok_embeddings.weight": 0, "layers.0.attention.wo.weight": 1, "norm.weight": None}
    assert padded_vocab(5, 2) == 6 and padded_vocab(6, 2) == 6
    shards = [shard_full(full, axes, r, 2) for r in range(2)]
    assert shards[0]["tok_embeddings.weight"].shape == (3, 3)
    assert (shards[1]["tok_embeddings.weight"][-1] == 0).all()  # the padding row
    for name, axis in axes.items():
        if axis is None:
            assert all(s[name] is full[name] for s in shards)
            continue
        joined = np.concatenate([s[name] for s in shards], axis)
        np.testing.assert_array_equal(joined[tuple(slice(0, n) for n in full[name].shape)], full[name])


def test_launch_dry_run_prints_the_layout(capsys):
    from ascend_llm.cli.launch import main

    assert main(["cluster=cpu_4proc", "parallel=tp2_dp2", "model=debug", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--worker_num=4 --local_worker_num=4" in out
    assert "# rank 1: dp=0 cp=0 tp=1" in out and "# rank 2: dp=1 cp=0 tp=0" in out
