"""What the training loop needs to know about the (dp, cp, tp) layout: one object, built once per rank.

`TrainLayout(parallel, groups)` (groups from `parallel.dims.build_groups`, which works in one process too:
every group then has size 1) answers, for this rank:

- data: `local_rows(indices)` is this data-parallel replica's contiguous share of a global batch (every TP/CP
  rank of one replica reads the same rows: `shard_rows(indices, dp_rank, dp)`), and `local_batch(x, y)` is
  this CP rank's zigzag slice of the sequence (`cp.shard_sequence`; identity at cp=1);
- `grad_reducer()`: gradients and the logged loss summed over the CP ranks (each holds its share of the loss)
  and averaged over the dp replicas, over `groups.dp_cp`; TP shards are not reduced (parallel/cp.py's doc);
- `loss_fn(vocab_size, plain, masked)`: the plain loss when tp = cp = 1 (and no document mask under DP),
  else `VocabParallelCrossEntropy` (vocab-sharded logits, token count summed over dp x cp: the token mean of
  the global batch);
- `grad_norm(params)`: `TPGradNorm` over `groups.tp` when tp > 1 (the global norm for clipping), else None;
- `sharding(model, full_shapes)`: how `ParameterState` gathers full tensors on save and shards them on load;
- `full_logits(model)`: a forward for sampling that takes the full (1, S) tokens on every rank and returns
  the full (1, S, vocab) logits (gathered over CP and TP), so `train.sample.generate` needs no change.

Everything here that runs collectives must run on every rank (the step, validation, the closing sample, the
checkpoint gather).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from mindspore import Tensor, nn, ops

from ascend_llm.data import shard_rows
from ascend_llm.parallel.cp import gathered_order, shard_sequence
from ascend_llm.parallel.dims import ParallelGroups


@dataclass(frozen=True)
class TPSharding:
    """How a list of parameters is sharded over TP: `axes` {name: sharded axis or None}, `full_shapes`
    {name: unsharded, unpadded shape}, `replicas` {name: R} for KV-head shards replicated on R TP ranks.
    Optimizer moments `adam_m.<p>` / `adam_v.<p>` follow their parameter."""

    group: Any  # comm.Group (the TP group)
    axes: dict[str, int | None]
    full_shapes: dict[str, tuple]
    replicas: dict[str, int] = field(default_factory=dict)  # {name: R} of KV shards replicated on R TP ranks

    @staticmethod
    def base_name(name: str) -> str:
        for prefix in ("adam_m.", "adam_v."):
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    def axis(self, name: str) -> int | None:
        return self.axes.get(self.base_name(name))

    def num_replicas(self, name: str) -> int:
        """R when `name` (or the parameter of a moment) is a KV shard replicated on R TP ranks, else 1."""
        return self.replicas.get(self.base_name(name), 1)

    def full_shape(self, name: str, current: tuple) -> tuple:
        """The unsharded shape of `name`; `current` (its shard's shape) when it is not TP-sharded."""
        if self.axis(name) is None:
            return tuple(current)
        return tuple(self.full_shapes[self.base_name(name)])


class _FullLogits:
    """Callable (1, S) int32 Tensor -> (1, S, vocab) float32 Tensor on every rank; see TrainLayout.full_logits."""

    def __init__(self, model: nn.Cell, layout: TrainLayout, vocab_size: int):
        from ascend_llm.parallel.comm import AllGather

        self.model, self.layout, self.vocab = model, layout, vocab_size
        self.gather_tp = AllGather(layout.groups.tp, 2) if layout.tp > 1 else None
        self.gather_cp = AllGather(layout.groups.cp, 1) if layout.cp > 1 else None

    def __call__(self, tokens: Tensor) -> Tensor:
        layout = self.layout
        local = Tensor(shard_sequence(tokens.asnumpy(), layout.cp, layout.cp_rank))
        logits = self.model(local)
        if isinstance(logits, tuple):  # a Mixture-of-Experts model in training form: (logits, aux_loss)
            logits = logits[0]
        if self.gather_tp is not None:
            logits = self.gather_tp(logits)
        if self.gather_cp is not None:
            order = Tensor(gathered_order(tokens.shape[1], layout.cp))
            logits = ops.gather(self.gather_cp(logits), order, 1)
        return logits[..., :self.vocab]


@dataclass(frozen=True)
class TrainLayout:
    """This rank's place in the (dp, cp, tp) layout and what the loop derives from it (module doc)."""

    parallel: Any  # config.parallel.ParallelConfig
    groups: ParallelGroups

    @property
    def dp(self) -> int:
        return int(self.parallel.data_parallel_degree)

    @property
    def cp(self) -> int:
        return int(self.parallel.context_parallel_degree)

    @property
    def tp(self) -> int:
        return int(self.parallel.tensor_parallel_degree)

    @property
    def dp_rank(self) -> int:
        return self.groups.dp_rank

    @property
    def cp_rank(self) -> int:
        return self.groups.cp_rank

    @property
    def tp_rank(self) -> int:
        return self.groups.tp_rank

    def coordinates(self) -> str:
        """'dp=i cp=j tp=k' of this rank."""
        return f"dp={self.dp_rank} cp={self.cp_rank} tp={self.tp_rank}"

    def local_rows(self, indices: np.ndarray) -> np.ndarray:
        """This replica's contiguous share of the global batch's window indices (len(indices) / dp of them)."""
        return shard_rows(indices, self.dp_rank, self.dp)

    def local_batch(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """This CP rank's zigzag slice (axis 1) of each (B, S) array: tokens, targets, segment ids; a per-row
        (B,) array (preference tuning's cached reference log-probabilities) is the same on every CP rank."""
        if self.cp == 1:
            return arrays
        return tuple(np.ascontiguousarray(shard_sequence(a, self.cp, self.cp_rank)) if a.ndim > 1 else a
                     for a in arrays)

    @property
    def ep(self) -> int:
        return int(getattr(self.parallel, "expert_parallel_degree", 1))

    def grad_reducer(self, world_size: int, params=None) -> Callable[[tuple], tuple]:
        """Sum over dp_cp, times 1/dp: the DP mean of the CP-summed shares; identity in one process. Under expert
        parallel (ep > 1; `params` needed) expert shards are summed over their expert-data-parallel group
        (parallel/ep.py ExpertGradReducer)."""
        from ascend_llm.parallel.dp import build_grad_reducer

        if self.ep > 1:
            from ascend_llm.parallel.ep import ExpertGradReducer, build_ep_groups

            return ExpertGradReducer(params, self.groups.dp_cp, build_ep_groups(self.parallel)[1], 1.0 / self.dp)
        if world_size == 1:
            return build_grad_reducer(None, 1)
        return build_grad_reducer(None, world_size, group=self.groups.dp_cp, scale=1.0 / self.dp)

    def loss_fn(self, vocab_size: int, plain: Callable, masked: bool = False) -> Callable:
        """`plain` (the single-process loss, logits (B, S, V), labels (B, S)) when tp = cp = 1 and every
        replica counts the same tokens (no document mask, or dp = 1); else the vocab-parallel cross-entropy
        over groups.tp (size 1 without TP) with the token count summed over groups.dp_cp and scaled by dp, so
        the reduced loss is the token mean over the whole global batch, as in one process (Megatron's
        per-token loss), also when document masking leaves replicas with different token counts."""
        if self.tp == 1 and self.cp == 1 and (self.dp == 1 or not masked):
            return plain
        from ascend_llm.parallel.tp import VocabParallelCrossEntropy

        return VocabParallelCrossEntropy(self.groups.tp, vocab_size, count_group=self.groups.dp_cp,
                                         count_scale=self.dp)

    def grad_norm(self, params) -> nn.Cell | None:
        """TPGradNorm(params, groups.tp) when tp > 1 (the clipping norm over all shards), ExpertGradNorm over the
        EP group when ep > 1, else None."""
        if self.ep > 1:
            from ascend_llm.parallel.ep import ExpertGradNorm, build_ep_groups

            return ExpertGradNorm(params, build_ep_groups(self.parallel)[0])
        if self.tp == 1:
            return None
        from ascend_llm.parallel.tp import TPGradNorm

        return TPGradNorm(params, self.groups.tp)

    def sharding(self, model: nn.Cell, full_shapes: dict[str, tuple]) -> TPSharding | None:
        """The TP (or EP: expert shards along axis 0 over the EP group) sharding of `model`'s parameters (None when
        tp = ep = 1) for ParameterState."""
        if self.ep > 1:
            from ascend_llm.parallel import ep

            params = model.get_parameters()
            return TPSharding(ep.build_ep_groups(self.parallel)[0], ep.ep_shard_axes(model.get_parameters()),
                              ep.full_shapes(params, self.ep))
        if self.tp == 1:
            return None
        from ascend_llm.parallel.tp import tp_replicas, tp_shard_axes

        return TPSharding(self.groups.tp, tp_shard_axes(model), dict(full_shapes), tp_replicas(model))

    def full_logits(self, model: nn.Cell, vocab_size: int) -> Callable:
        """`model` itself when tp = cp = 1; else a callable with the full model's input and output (module doc)."""
        if self.tp == 1 and self.cp == 1:
            return model
        return _FullLogits(model, self, vocab_size)
