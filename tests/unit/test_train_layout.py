"""The trainer's view of the (dp, cp, tp) layout in one process: which rows and sequence positions a rank
reads, which loss/norm/sharding it uses, and the recipe checks that span groups. Expected values are written
out by hand from the layout rule (rank = (dp * C + cp) * T + tp; zigzag chunks r and 2C-1-r). The
multi-process training is in tests/integration/test_tpcp_train_msrun.py."""

from __future__ import annotations

import types

import numpy as np
import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.config.parallel import ParallelConfig
from ascend_llm.errors import ConfigError
from ascend_llm.parallel.dims import build_groups
from ascend_llm.train.layout import TPSharding, TrainLayout
from ascend_llm.train.step import cross_entropy_loss


def fake_groups(dp_rank=0, cp_rank=0, tp_rank=0):
    return types.SimpleNamespace(dp_rank=dp_rank, cp_rank=cp_rank, tp_rank=tp_rank)


def test_replica_rows_and_zigzag_positions():
    layout = TrainLayout(ParallelConfig(data_parallel_degree=2, context_parallel_degree=2),
                         fake_groups(dp_rank=1, cp_rank=1))
    np.testing.assert_array_equal(layout.local_rows(np.arange(10, 18)), [14, 15, 16, 17])
    tokens = np.arange(16).reshape(2, 8)
    targets = tokens + 100
    # S=8, C=2: chunks of 2; CP rank 1 holds chunks 1 and 2, i.e. positions 2, 3, 4, 5
    x, y = layout.local_batch(tokens, targets)
    np.testing.assert_array_equal(x, [[2, 3, 4, 5], [10, 11, 12, 13]])
    np.testing.assert_array_equal(y, x + 100)
    rank0 = TrainLayout(ParallelConfig(context_parallel_degree=2), fake_groups(cp_rank=0))
    np.testing.assert_array_equal(rank0.local_batch(tokens)[0], [[0, 1, 6, 7], [8, 9, 14, 15]])


def test_one_process_layout_changes_nothing():
    one = ParallelConfig(data_parallel_degree=1)  # a validated single-process recipe resolves 0 to 1
    layout = TrainLayout(one, build_groups(one))
    assert layout.coordinates() == "dp=0 cp=0 tp=0"
    rows = np.arange(8)
    assert layout.local_rows(rows) is not None and list(layout.local_rows(rows)) == list(rows)
    x = np.ones((2, 4), np.int32)
    assert layout.local_batch(x)[0] is x
    assert layout.loss_fn(100, cross_entropy_loss) is cross_entropy_loss
    assert layout.grad_norm([]) is None and layout.sharding(None, {}) is None
    model = object()
    assert layout.full_logits(model, 100) is model


def test_optimizer_moments_follow_their_parameter_axis_and_full_shape():
    sharding = TPSharding(group=None, axes={"w": 0, "norm.weight": None}, full_shapes={"w": (7, 4)})
    for name in ("w", "adam_m.w", "adam_v.w"):
        assert sharding.axis(name) == 0 and sharding.full_shape(name, (4, 4)) == (7, 4)
    assert sharding.axis("adam_m.norm.weight") is None
    assert sharding.full_shape("adam_step", ()) == ()


def test_batch_must_divide_by_the_data_parallel_degree_not_the_world():
    tp = ["debug=smoke", "cluster=cpu_2proc", "parallel=tp2", "train.global_batch_size=3"]
    assert compose_recipe(tp).train.global_batch_size == 3  # TP ranks share their replica's rows
    with pytest.raises(ConfigError, match=r"train.global_batch_size.*data_parallel_degree=2"):
        compose_recipe(["debug=smoke", "cluster=cpu_2proc", "parallel=dp2", "train.global_batch_size=3"])


def test_recipe_checks_context_parallel_sequence_length_and_tp_heads():
    with pytest.raises(ConfigError, match=r"data.seq_len.*2\*parallel.context_parallel_degree=4"):
        compose_recipe(["debug=smoke", "cluster=cpu_2proc", "parallel=cp2", "data.seq_len=66"])
    with pytest.raises(ConfigError, match="parallel.tensor_parallel_degree"):
        compose_recipe(["debug=smoke", "cluster=cpu_2proc", "parallel=tp2", "model.dim=96", "model.num_heads=6",
                        "model.num_kv_heads=3"])
