"""Expert parallel (EP) for Mixture-of-Experts layers: each sparse layer's E experts sharded over an EP group,
tokens dispatched to the experts' ranks and their outputs combined by all-to-all (`comm.AllToAll`: HCCL's
AlltoAll on Ascend, an exact all-gather equivalent on CPU).

Layout. EP is carved out of data parallel (Megatron's expert-model-parallel): the data-parallel ranks, in dp
order, are cut into groups of `expert_parallel_degree` = ep consecutive ranks (the EP groups); EP rank r of a
group holds experts [r E/ep, (r+1) E/ep). The ranks holding the same experts (same EP rank in every group) form
the expert-data-parallel group, of dp / ep ranks. Every rank keeps its own tokens (it is a data-parallel rank),
and all non-expert parameters stay replicated.

Dispatch and combine (dropless, static shapes). Of a rank's N tokens with top-k routing, each of the P = N k
(token, expert) pairs goes to the EP rank owning its expert. The send buffer has ep chunks of C = P rows (the
worst case: every pair to one rank); a pair's row is (target rank) * C + (its order among the pairs to that
rank, a cumsum of one-hot rows), its last column the expert's local index (-1 on empty rows). One all-to-all
delivers the rows; the receiving rank runs its experts on them (models/moe.py grouped_swiglu, weight 1); a
second all-to-all returns the outputs, and the source sums them with its routing weights. Both exchanges are
permutations among the group, so autodiff's backward is the same exchange of the gradients (comm.AllToAll).

Gradients. A rank's expert gradient already sums the contributions of every token of its EP group (through
the exchanges), so expert gradients are summed over the expert-data-parallel group and scaled by 1/dp, the
others summed over the data-parallel group and scaled by 1/dp (`ExpertGradReducer`): the gradient of the mean
loss over the dp ranks, as in one process. The clipping norm counts each expert shard once
(`ExpertGradNorm`). Checkpoints stay layout-free: expert parameters (and their AdamW moments) are gathered
along axis 0 over the EP group on save and sliced on load (`ep_shard_axes`, used by train/layout.py).

ZeRO (parallel/zero.py, `expert_groups`): the replicated parameters' optimizer state (stage 1) and gradients
(stage 2) are sharded over the data-parallel group, the expert shards' over their expert-data-parallel group
(Megatron's expert_data_parallel, DeepSpeed-MoE); with dp = ep that group is one rank, so expert state is not
divided further.

No AlltoAllV. MindSpore 2.10 ships `ops.AlltoAllV` and `ops.AlltoAllVC` (per-rank element counts; Ascend only by
their docs, not in CPU MCCL). Their output length is the received count, known only at run time (a dynamic shape
in the compiled graph, plus a count exchange before each dispatch); they are not used, and nothing here was run on
Ascend. The static buffers above are what AlltoAll allows: worst case (dropless) or `capacity_factor` rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.models.moe import MoEFeedForward, grouped_swiglu
from ascend_llm.optim.each import each, square_sum
from ascend_llm.parallel.comm import AllReduce, AllToAll, Group, new_group, world_group

EP_AXIS = "ep_axis"  # attribute set on expert parameters: the axis sharded over the EP group (0)


def ep_group_ranks(dp_ranks: list[int], rank: int, ep: int) -> tuple[list[int], list[int]]:
    """(EP group, expert-data-parallel group) of `rank`, world ranks, from its data-parallel group `dp_ranks`
    (dp order): consecutive blocks of ep ranks, and the ranks at the same position of every block."""
    index = dp_ranks.index(rank)
    block = index // ep
    return dp_ranks[block * ep:(block + 1) * ep], dp_ranks[index % ep::ep]


def build_ep_groups(parallel: Any) -> tuple[Group, Group]:
    """This rank's (EP group, expert-data-parallel group); every rank calls it (after init_distributed)."""
    from ascend_llm.parallel.dims import axis_ranks

    rank = world_group().rank
    ep = int(parallel.expert_parallel_degree)
    ep_ranks, edp_ranks = ep_group_ranks(axis_ranks(parallel, rank, "dp"), rank, ep)
    return (new_group("ep_" + "_".join(map(str, ep_ranks)), ep_ranks),
            new_group("edp_" + "_".join(map(str, edp_ranks)), edp_ranks))


def capacity_rows(pairs: int, size: int, capacity_factor: float) -> int:
    """Rows C of each destination's chunk: P (dropless: every pair could go to one rank) when capacity_factor is
    0, else min(P, ceil(capacity_factor * P / size)) (GShard / Switch Transformer expert capacity)."""
    if capacity_factor <= 0:
        return pairs
    return min(pairs, int(math.ceil(capacity_factor * pairs / size)))


class ExpertParallelExperts(nn.Cell):
    """This rank's E/ep experts (the cells w1, w3, w2 of a GroupedExperts, sliced) behind the all-to-all
    dispatch and combine of the module docstring. Same call as GroupedExperts: construct(x (N, H), weights
    (N, k), indices (N, k) int32 global expert ids) -> (N, H) in x's dtype. capacity_factor > 0 bounds each
    destination's chunk (`capacity_rows`); the pairs beyond it, in token order, are dropped (their expert output
    counts 0, as in GShard and Switch Transformer); 0 is dropless."""

    def __init__(self, experts: nn.Cell, group: Group, num_experts: int, capacity_factor: float = 0.0):
        super().__init__()
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3
        self.compute_dtype = experts.compute_dtype  # the precision policy's GEMM dtype, None: x's dtype
        self.size, self.num_local = group.size, num_experts // group.size
        self.capacity_factor = float(capacity_factor)
        self.exchange = AllToAll(group)

    def dispatch_rows(self, flat, pairs: int, capacity: int):
        """flat (P,) global expert ids -> (send-buffer row of each pair, size * capacity for a dropped pair;
        local expert id of each pair)."""
        target = flat // self.num_local
        onehot = ops.one_hot(target, self.size, Tensor(1, mstype.int32), Tensor(0, mstype.int32))
        slot = (ops.cumsum(onehot, 0) * onehot).sum(1) - 1  # order among the pairs to the same rank
        row = ops.where(slot < capacity, target * capacity + slot, ops.full_like(slot, self.size * capacity))
        return row, flat - target * self.num_local

    def construct(self, x, weights, indices):
        num_tokens, top_k = indices.shape
        pairs, dim = num_tokens * top_k, x.shape[1]
        capacity = capacity_rows(pairs, self.size, self.capacity_factor)
        row, local = self.dispatch_rows(indices.reshape(pairs), pairs, capacity)
        rows = (self.size * capacity + 1, )  # the last row collects the dropped pairs and is not sent
        token = ops.scatter_nd(row.reshape(pairs, 1), ops.arange(pairs, dtype=mstype.int32) // top_k + 1, rows) - 1
        local = (ops.scatter_nd(row.reshape(pairs, 1), local + 1, rows) - 1)[:-1]
        x_ext = ops.concat((x, ops.zeros((1, dim), x.dtype)), 0)
        send = ops.gather(x_ext, ops.where(token < 0, ops.full_like(token, num_tokens), token)[:-1], 0)
        ids = ops.stop_gradient(local.astype(x.dtype).reshape(-1, 1))
        received = self.exchange(ops.concat((send, ids), 1))
        expert = received[:, dim].astype(mstype.int32)
        valid = expert >= 0
        dtype = x.dtype if self.compute_dtype is None else self.compute_dtype
        out = grouped_swiglu(received[:, :dim].astype(dtype), valid.astype(dtype).reshape(-1, 1),
                             ops.where(valid, expert, ops.zeros_like(expert)).reshape(-1, 1),
                             self.w1.expert_weight().astype(dtype), self.w3.expert_weight().astype(dtype),
                             self.w2.expert_weight().astype(dtype)).astype(x.dtype)
        back = ops.concat((self.exchange(out), ops.zeros((1, dim), x.dtype)), 0)  # + the dropped pairs' zero row
        y = ops.gather(back, row, 0) * weights.reshape(pairs, 1).astype(x.dtype)
        return y.reshape(num_tokens, top_k, dim).sum(1)


def apply_expert_parallel(model: nn.Cell, group: Group, capacity_factor: float = 0.0) -> int:
    """Shard every MoEFeedForward's experts over `group` (mutates the model): each expert parameter (weights
    and LoRA adapters, all (E, ...)) keeps rows [rank E/ep, (rank+1) E/ep) and is marked `ep_axis = 0`; the
    experts cell becomes an ExpertParallelExperts with the same parameter names. Returns the number of sparse
    layers converted; the identity for a group of size 1."""
    if group.size == 1:
        return 0
    converted = 0
    for _, cell in list(model.cells_and_names()):
        if not isinstance(cell, MoEFeedForward):
            continue
        per = cell.num_experts // group.size
        for param in cell.experts.get_parameters():
            full = param.asnumpy()
            param.set_data(Tensor(np.ascontiguousarray(full[group.rank * per:(group.rank + 1) * per]), param.dtype))
            setattr(param, EP_AXIS, 0)
        cell.experts = ExpertParallelExperts(cell.experts, group, cell.num_experts, capacity_factor)
        converted += 1
    model.update_parameters_name()
    return converted


def ep_shard_axes(params) -> dict[str, int | None]:
    """{parameter name: 0 for expert shards, None otherwise}: the axes a layout-free checkpoint gathers/slices."""
    return {p.name: getattr(p, EP_AXIS, None) for p in params}


def full_shapes(params, size: int) -> dict[str, tuple]:
    """{parameter name: unsharded shape}: expert shards have size times the rows along axis 0."""
    return {p.name: ((p.shape[0] * size,) + tuple(p.shape[1:])) if getattr(p, EP_AXIS, None) is not None
            else tuple(p.shape) for p in params}


def _reduce_by_flag(dense, expert, scale, is_expert, t):
    if is_expert:
        return expert(t) * scale
    return dense(t) * scale


def _reduce_dense(dense, scale, t):
    return dense(t) * scale


class ExpertGradReducer(nn.Cell):
    """The trainer's `reduce(tensors) -> tensors` under EP (module docstring): a tuple in the order of `params`
    (the gradients) is summed per tensor over `edp_group` (expert shards) or `dp_group` (the rest), times
    `scale` (1/dp); any other tuple (the loss, aux metrics) over `dp_group`, times `scale`."""

    def __init__(self, params, dp_group: Group, edp_group: Group, scale: float):
        super().__init__()
        self.flags = tuple(getattr(p, EP_AXIS, None) is not None for p in params)
        self.dense, self.expert = AllReduce(dp_group), AllReduce(edp_group)
        self.scale = float(scale)

    def construct(self, tensors):
        if len(tensors) != len(self.flags):
            return each(ops.partial(_reduce_dense, self.dense, self.scale), tensors)
        return each(ops.partial(_reduce_by_flag, self.dense, self.expert, self.scale), self.flags, tensors)


class ExpertGradNorm(nn.Cell):
    """Global L2 norm of gradients with expert shards: sqrt(sum over replicated |g|^2 + all-reduce over the EP
    group of the sum over expert shards |g|^2). construct(grads: tuple in the order of params) -> float32."""

    def __init__(self, params, ep_group: Group):
        super().__init__()
        flags = [getattr(p, EP_AXIS, None) is not None for p in params]
        self.dense_weights = tuple(0.0 if f else 1.0 for f in flags)
        self.expert_weights = tuple(1.0 if f else 0.0 for f in flags)
        self.reduce = AllReduce(ep_group)

    def construct(self, grads):
        return ops.sqrt(square_sum(grads, self.dense_weights) + self.reduce(square_sum(grads, self.expert_weights)))


class ExpertParallelConverter:
    """Trainer converter (train/build.py): `apply_expert_parallel` over this rank's EP group when
    parallel.expert_parallel_degree > 1 (after tensor/context parallel, before recompute)."""

    name = "expert_parallel"

    def __init__(self, parallel: Any):
        self.parallel = parallel

    def convert(self, model: nn.Cell) -> None:
        if int(getattr(self.parallel, "expert_parallel_degree", 1)) > 1:
            apply_expert_parallel(model, build_ep_groups(self.parallel)[0],
                                  float(getattr(self.parallel, "expert_capacity_factor", 0.0)))
