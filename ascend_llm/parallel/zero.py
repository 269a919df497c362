"""Sharded AdamW over the data-parallel group: ZeRO stage 1 and 2 (Rajbhandari et al. 2020, sec. 5).

`ZeroAdamW(params, cfg, stage, group, grad_clip, tp_group, grad_scale)` has the call signature of
`ascend_llm.optim.adamw.AdamW`: `optimizer(grads, lr) -> step` inside the compiled step, and
`state_parameters()` (this rank's shards).

With tensor/context parallel (Megatron's distributed optimizer) `group` is the ranks holding identical
parameters, data x context parallel for one TP rank (`parallel.dims` groups.dp_cp); `params` are this TP rank's
shards (parallel/tp.py), sharded again over `group`. Gradients are summed over dp x cp and scaled by
`grad_scale` = 1/dp (the trainer's reducer, train/layout.py); the clipping norm adds the TP reduction
(`tp.sharded_norm_weights`, as `tp.TPGradNorm`); `shards_finite` agrees on finiteness over `group` and
`tp_group`; layout-free state is gathered over `group`, then over `tp_group` (`tp.gather_full`, from the
parameters' `tp_axis`, `tp_replicas`, `tp_full_shape`).

Layout. Each parameter of n elements is flattened and zero-padded to d * ceil(n/d) (d = group size); rank r
owns elements [r*c, (r+1)*c) with c = ceil(n/d). Per parameter the rank keeps the AdamW moments m and v of its
slice (float32, `zero_m.<name>`, `zero_v.<name>`) and, when the parameter is not float32 (bf16 on Ascend),
float32 master weights of it (`zero_master.<name>`: Megatron's distributed-optimizer layout). Optimizer state
per rank: 8 * sum(ceil(n/d)) + 4 bytes (+ 4 * sum(ceil(n/d)) of master weights), the figure `ascend-llm plan`
uses. Working per parameter (not on one flat copy of the model) bounds the optimizer's transient buffers by
the largest parameter.

One optimizer call:
1. gradients to this rank's shards (`reduce_gradients`):
   stage 1: `grads` are already averaged over the group (the trainer's all-reduce): take this rank's slices;
   stage 2: `grads` are this rank's local gradients: each is reduce-scattered (sum) and multiplied by
   `grad_scale` (default 1/d; 1/dp under context parallel, whose ranks hold shares of one loss), so only
   the shard of the average is kept (the trainer can accumulate micro-batches in these shards: 1/d memory);
   with `grad_clip` > 0 the shards are clipped by the global norm (sum of squares all-reduced over the group),
   since no rank holds the full gradient.
2. AdamW on the shards, exactly the unsharded formula of optim/adamw.py: m, v, bias correction, decoupled
   weight decay (norm weights and biases not decayed).
3. all-gather of the updated shards and assignment of every full parameter.
Collectives go through `ascend_llm.parallel.comm` (native HCCL ops on Ascend; exact AllReduce-based
equivalents on CPU) and are chained by data dependencies (`ops.depend`), so every rank issues them in the same
order (comm.py's ordering rule).

With expert parallel (parallel/ep.py; `expert_groups` = (expert-data-parallel group, EP group)) the expert shards
(parameters with `ep_axis`) are sharded over the expert-data-parallel group instead (the ranks holding the same
experts: Megatron's expert_data_parallel, DeepSpeed-MoE), the others over `group` (data parallel); both
reduce-scatters scale by `grad_scale` = 1/dp, as the trainer's reducer (ep.ExpertGradReducer). The data-parallel
group is the EP groups times the expert-data-parallel groups, so the clipping norm's and the finiteness check's
sums over `group` count every expert shard once. Layout-free state gathers the expert moments over the EP group
along axis 0 too (and `load_full_state_dict` slices them).

Checkpoints stay layout-free: `full_state_dict()` gathers the shards and returns the same names and shapes
as the unsharded AdamW (`adam_step`, `adam_m.<param>`, `adam_v.<param>`, plus `master.<param>` when master
weights exist); `load_full_state_dict()` takes such a dict (from any degree, or one process) and keeps this
rank's shard. Both are collective or local as noted and must run on every rank of the group.
"""

from __future__ import annotations

from math import ceil
from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, amp, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.optim import OptimConfig
from ascend_llm.errors import CheckpointError, ConfigError
from ascend_llm.optim.adamw import adamw_update, clip_to_norm, decays
from ascend_llm.optim.each import each, square_sum
from ascend_llm.parallel import comm
from ascend_llm.parallel.tp import replicated_norm_weights, sharded_norm_weights


def _own_slice(start: int, stop: int, chunk: int, tensor):
    """tensor flattened, as float32, [start, stop) zero-padded to `chunk` elements (cast first: CPU slices have no
    bf16 kernel)."""
    if stop == start:
        return ops.zeros((chunk,), mstype.float32)
    flat = tensor.reshape(-1).astype(mstype.float32)[start:stop]
    if chunk > stop - start:
        return ops.concat((flat, ops.zeros((chunk - (stop - start),), mstype.float32)), 0)
    return flat


def _padded_flat(pad: int, tensor):
    """tensor flattened with `pad` zeros appended (to chunk * group size elements, for the reduce-scatter)."""
    flat = tensor.reshape(-1)
    return ops.concat((flat, ops.zeros((pad,), flat.dtype)), 0) if pad else flat


def _scaled_f32(scale: float, shard):
    return shard.astype(mstype.float32) * scale


def shard_numel(numel: int, size: int) -> int:
    """Elements of one parameter a rank owns: ceil(numel / size) (the last rank's tail is padding)."""
    return ceil(numel / size)


def owned_range(numel: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the real (unpadded) elements rank `rank` owns of a flattened parameter."""
    chunk = shard_numel(numel, size)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


class ZeroAdamW(nn.Cell):
    """AdamW whose state is sharded over `group` (default: the world). See the module doc.

    params: the trainable parameters replicated over `group` (any float dtype; TP shards under tensor
    parallel); cfg: OptimConfig; stage: 1 or 2; grad_clip: global-norm clip applied inside at stage 2 (at
    stage 1 the trainer clips the reduced gradients as today); tp_group: the TP group (comm.Group) when the
    parameters are TP shards, else None; grad_scale: stage 2's factor on the group-summed gradients (default
    1/group size); expert_groups: (expert-data-parallel group, EP group) under expert parallel (module doc),
    else None. Raises ConfigError for another stage.
    """

    def __init__(self, params: list[Parameter], cfg: OptimConfig, stage: int, group: Optional[Any] = None,
                 grad_clip: float = 0.0, tp_group: Optional[Any] = None, grad_scale: Optional[float] = None,
                 expert_groups: Optional[tuple] = None):
        super().__init__(auto_prefix=False)
        if stage not in (1, 2):
            raise ConfigError("parallel.zero_stage", stage, "ZeroAdamW implements stages 1 and 2")
        self.group = group if group is not None else comm.world_group()
        self.stage, self.size, self.rank = stage, self.group.size, self.group.rank
        self.grad_scale = 1.0 / self.size if grad_scale is None else float(grad_scale)
        self.tp_group = tp_group if tp_group is not None and tp_group.size > 1 else None
        self.tp_weights = sharded_norm_weights(params) if self.tp_group is not None else (0.0,) * len(params)
        self.replicated_weights = replicated_norm_weights(self.tp_weights)
        self.tp_sum = comm.AllReduce(self.tp_group, "sum") if self.tp_group is not None else None
        self.params = tuple(params)
        self.sizes = tuple(int(np.prod(p.shape)) for p in params)
        self.edp_group, self.ep_group = expert_groups if expert_groups is not None else (self.group, None)
        self.is_expert = tuple(self.ep_group is not None and getattr(p, "ep_axis", None) is not None for p in params)
        where = [(self.edp_group.size, self.edp_group.rank) if e else (self.size, self.rank) for e in self.is_expert]
        self.chunks = tuple(shard_numel(n, d) for n, (d, _) in zip(self.sizes, where))
        self.ranges = tuple(owned_range(n, d, r) for n, (d, r) in zip(self.sizes, where))
        self.starts, self.stops = tuple(r[0] for r in self.ranges), tuple(r[1] for r in self.ranges)
        self.pads = tuple(c * d - n for c, n, (d, _) in zip(self.chunks, self.sizes, where))
        self.beta1, self.beta2, self.eps = cfg.beta1, cfg.beta2, cfg.eps
        self.weight_decay = tuple(cfg.weight_decay if decays(p.name) else 0.0 for p in params)
        self.grad_clip = float(grad_clip) if stage == 2 else 0.0
        self.has_master = any(p.dtype != mstype.float32 for p in params)
        self.exp_avg = ParameterTuple(self._shard_param("zero_m.", p, c) for p, c in zip(params, self.chunks))
        self.exp_avg_sq = ParameterTuple(self._shard_param("zero_v.", p, c) for p, c in zip(params, self.chunks))
        self.step = Parameter(Tensor(0, mstype.int32), name="adam_step", requires_grad=False)
        if self.has_master:
            self.master = ParameterTuple(
                Parameter(Tensor(self._local(p.asnumpy(), i)), name="zero_master." + p.name, requires_grad=False)
                for i, p in enumerate(params))
        self.scatter = comm.ReduceScatter(self.group, 0)
        self.gather = comm.AllGather(self.group, 0)
        self.expert_scatter = comm.ReduceScatter(self.edp_group, 0)  # expert shards (expert parallel only)
        self.expert_gather = comm.AllGather(self.edp_group, 0)
        self.sum = comm.AllReduce(self.group, "sum")
        # Gather in the parameter dtype on Ascend (half the traffic for bf16); float32 on CPU, whose
        # StridedSlice and Assign kernels have no bf16.
        self.native = ms.get_context("device_target") == "Ascend"

    @staticmethod
    def _shard_param(prefix: str, param: Parameter, chunk: int) -> Parameter:
        return Parameter(Tensor(np.zeros(chunk, np.float32)), name=prefix + param.name, requires_grad=False)

    def state_parameters(self) -> list[Parameter]:
        """This rank's optimizer state (step, m and v shards, master shards when present)."""
        return [self.step, *self.exp_avg, *self.exp_avg_sq, *(self.master if self.has_master else ())]

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state (`state_parameters()`): 8 * sum(ceil(n/d)) + 4 (+ master)."""
        return sum(int(np.prod(p.shape)) * p.itemsize for p in self.state_parameters())

    # -- compiled pieces ---------------------------------------------------------------------------------
    # Per-parameter arithmetic is mapped with `each` (HyperMap: compiles in a fraction of the time of an
    # unrolled loop, see optim/each.py); only the collectives run in a loop, chained by `ops.depend` so every
    # rank issues them in the same order.
    def _slices(self, tensors):
        """(this rank's float32 slice of each parameter-shaped tensor,)"""
        return each(_own_slice, self.starts, self.stops, self.chunks, tensors)

    def reduce_gradients(self, grads):
        """(full gradients,) -> tuple of this rank's float32 shards of the group-average gradient."""
        if self.stage == 1:
            return self._slices(grads)
        flats = each(_padded_flat, self.pads, grads)
        shards, previous = (), None
        # last parameter first: roughly the order the backward produces the gradients (output head first,
        # embedding last), so the chain does not hold every reduce-scatter until the embedding's gradient exists
        count = len(self.params)
        for j in range(count):
            i = count - 1 - j
            flat = flats[i] if previous is None else ops.depend(flats[i], previous)
            if self.is_expert[i]:
                previous = self.expert_scatter(flat)
            else:
                previous = self.scatter(flat)
            shards = (previous,) + shards
        return each(ops.partial(_scaled_f32, self.grad_scale), shards)

    def shards_finite(self, shards):
        """Whether every gradient shard on every rank of `group` and `tp_group` is finite: a bool scalar, the same
        on every rank (a rank that skipped the update alone would leave its replicas behind)."""
        local = ops.depend(amp.all_finite(shards).astype(mstype.float32), shards[-1]).reshape(1)
        count = self.sum(local)
        if self.tp_sum is not None:
            count = self.tp_sum(count)
        expected = self.size * (self.tp_group.size if self.tp_group is not None else 1)
        return count[0] > expected - 0.5

    def global_norm(self, shards):
        """L2 norm of the whole gradient from this rank's shards: sum of squares over `group`, and with TP the
        TP-sharded part summed over `tp_group` too (each weighted as in `tp.sharded_norm_weights`)."""
        replicated, sharded = square_sum(shards, self.replicated_weights), square_sum(shards, self.tp_weights)
        totals = self.sum(ops.stack((replicated, sharded)))
        if self.tp_sum is None:
            return ops.sqrt(totals[0] + totals[1])
        return ops.sqrt(totals[0] + self.tp_sum(totals[1:])[0])

    def clip_shards(self, shards):
        """Global-norm clipping of gradient shards (stage 2); returns (clipped shards, global norm)."""
        norm = self.global_norm(shards)
        return clip_to_norm(shards, norm, self.grad_clip), norm

    def apply_shards(self, shards, lr):
        """AdamW on this rank's shards, then all-gather and assign the full parameters. Returns the step."""
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(mstype.float32)
        bias1 = 1.0 - ops.pow(self.beta1, t)
        bias2 = 1.0 - ops.pow(self.beta2, t)
        current = self.master if self.has_master else self._slices(self.params)
        update = ops.partial(adamw_update, (self.beta1, self.beta2, self.eps), lr, bias1, bias2)
        news = each(update, self.weight_decay, current, self.exp_avg, self.exp_avg_sq, shards)
        if self.has_master:
            news = each(ops.assign, self.master, news)
        previous = None
        for i in range(len(self.params)):
            param, new = self.params[i], news[i]
            if self.native:
                new = new.astype(param.dtype)
            if previous is not None:
                new = ops.depend(new, previous)  # same collective order on every rank
            if self.is_expert[i]:
                previous = self.expert_gather(new)
            else:
                previous = self.gather(new)
            ops.assign(param, previous[:self.sizes[i]].reshape(param.shape).astype(param.dtype))
        return step

    def construct(self, grads, lr):
        """grads: tuple shaped like `params` (stage 1: already averaged over `group`; stage 2: this rank's local ones);
        lr: float32 scalar Tensor. Reduces to shards, clips (stage 2), updates, all-gathers the parameters in place
        and returns the new step (int32 scalar). Collective: every rank of the group calls it."""
        shards = self.reduce_gradients(grads)
        if self.stage == 2:
            shards, _ = self.clip_shards(shards)
        return self.apply_shards(shards, lr)

    # -- layout-free state ---------------------------------------------------------------------------------
    def _local(self, array: np.ndarray, i: int) -> np.ndarray:
        start, stop = self.ranges[i]
        out = np.zeros(self.chunks[i], np.float32)
        out[:stop - start] = np.asarray(array, np.float32).reshape(-1)[start:stop]
        return out

    def _gather_all(self, shards) -> list[np.ndarray]:
        """Each parameter's full array from this rank's flat shards (`shards`, in parameter order): the dense
        shards in one `comm.gather_arrays` over the ZeRO group, the expert shards in one over the expert-DP group
        (collectives: the same order on every rank)."""
        out: list[np.ndarray | None] = [None] * len(self.params)
        for group, expert in ((self.group, False), (self.edp_group, True)):
            idx = [i for i in range(len(self.params)) if self.is_expert[i] == expert]
            fulls = comm.gather_arrays([shards[i].asnumpy() for i in idx], group, [0] * len(idx))
            for i, full in zip(idx, fulls):
                out[i] = full[:self.sizes[i]].reshape(self.params[i].shape)
        return out

    def _tp_layout(self, prefix: str) -> tuple[dict, dict, dict]:
        """({name: TP axis}, {name: unsharded shape}, {name: KV replicas}) of `prefix + param name`."""
        axes, shapes, replicas = {}, {}, {}
        for p in self.params:
            name, axis = prefix + p.name, getattr(p, "tp_axis", None)
            axes[name] = axis
            shapes[name] = tuple(getattr(p, "tp_full_shape", p.shape)) if axis is not None else tuple(p.shape)
            replicas[name] = getattr(p, "tp_replicas", 1)
        return axes, shapes, replicas

    def full_shape(self, i: int) -> tuple:
        """Parameter i's layout-free shape: unsharded over TP (and over EP: all experts along axis 0)."""
        p = self.params[i]
        if self.is_expert[i]:
            return (p.shape[0] * self.ep_group.size,) + tuple(p.shape[1:])
        if self.tp_group is None or getattr(p, "tp_axis", None) is None:
            return tuple(p.shape)
        return tuple(p.tp_full_shape)

    def full_state_dict(self) -> dict[str, np.ndarray]:
        """The unsharded AdamW's state names and shapes (float32): gathered over `group`, then over `tp_group`;
        collective: call on every rank."""
        out = {"adam_step": self.step.asnumpy()}
        groups = [("adam_m.", self.exp_avg), ("adam_v.", self.exp_avg_sq)]
        if self.has_master:
            groups.append(("master.", self.master))
        for prefix, shards in groups:
            gathered = {prefix + p.name: full for p, full in zip(self.params, self._gather_all(shards))}
            if self.tp_group is not None:
                from ascend_llm.parallel.tp import gather_full

                axes, shapes, replicas = self._tp_layout(prefix)
                gathered = gather_full(gathered, axes, self.tp_group, shapes, replicas)
            if self.ep_group is not None:
                gathered = self._ep_gather(gathered, prefix)
            out.update(gathered)
        return out

    def load_full_state_dict(self, state: dict[str, np.ndarray], source: str = "optimizer state") -> None:
        """Keep this rank's shards of a full (layout-free) state (local, no communication); CheckpointError
        names a missing or misshaped entry. Master weights absent from `state` come from the parameters."""
        if "adam_step" not in state:
            raise CheckpointError(source, "adam_step", "missing from the optimizer state")
        moments = {prefix: self._tp_local(self._entries(state, prefix, source), prefix)
                   for prefix in ("adam_m.", "adam_v.")}
        masters = None
        if self.has_master:
            if all("master." + p.name in state for p in self.params):
                masters = self._tp_local(self._entries(state, "master.", source), "master.")
            else:
                masters = [p.asnumpy() for p in self.params]
        self.step.set_data(Tensor(np.asarray(state["adam_step"], np.int32).reshape(()), mstype.int32))
        for i in range(len(self.params)):
            self.exp_avg[i].set_data(Tensor(self._local(moments["adam_m."][i], i)))
            self.exp_avg_sq[i].set_data(Tensor(self._local(moments["adam_v."][i], i)))
            if masters is not None:
                self.master[i].set_data(Tensor(self._local(masters[i], i)))

    def _ep_gather(self, gathered: dict, prefix: str) -> dict:
        """Expert entries of `gathered` ({prefix + name: this EP rank's experts}) gathered over the EP group."""
        from ascend_llm.parallel.tp import gather_full

        axes = {prefix + p.name: 0 if e else None for p, e in zip(self.params, self.is_expert)}
        shapes = {prefix + p.name: self.full_shape(i) for i, p in enumerate(self.params)}
        return gather_full(gathered, axes, self.ep_group, shapes)

    def _tp_local(self, arrays: list[np.ndarray], prefix: str) -> list[np.ndarray]:
        """This TP rank's (under expert parallel: this EP rank's) shards of full (layout-free) arrays, in
        parameter order; identity without TP and EP."""
        if self.ep_group is not None:
            rank = self.ep_group.rank
            return [a[rank * p.shape[0]:(rank + 1) * p.shape[0]] if e else a
                    for a, p, e in zip(arrays, self.params, self.is_expert)]
        if self.tp_group is None:
            return arrays
        from ascend_llm.parallel.tp import shard_full

        axes, _, replicas = self._tp_layout(prefix)
        named = {prefix + p.name: a for p, a in zip(self.params, arrays)}
        local = shard_full(named, axes, self.tp_group.rank, self.tp_group.size, replicas)
        return [local[prefix + p.name] for p in self.params]

    def _entries(self, state: dict, prefix: str, source: str) -> list[np.ndarray]:
        arrays = []
        for i, p in enumerate(self.params):
            name, shape = prefix + p.name, self.full_shape(i)
            if name not in state:
                raise CheckpointError(source, name, "missing from the optimizer state (different model?)")
            if tuple(np.shape(state[name])) != shape:
                raise CheckpointError(f"{source}:{name}", tuple(np.shape(state[name])), f"shape must be {shape}")
            arrays.append(np.asarray(state[name]))
        return arrays
