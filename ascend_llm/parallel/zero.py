"""Sharded AdamW over the data-parallel group: ZeRO stage 1 and 2 (Rajbhandari et al. 2020, sec. 5).

`ZeroAdamW(params, cfg, stage, group)` has the call signature of `ascend_llm.train.optim.AdamW`:
`optimizer(grads, lr) -> step` inside the compiled step, and `state_parameters()` (this rank's shards).

Layout. The parameters are viewed as one flat float vector in declaration order, padded with zeros to a
multiple of the group size d; rank r owns elements [r*S, (r+1)*S) with S = ceil(P/d). It keeps the AdamW
moments m and v (float32) for those elements only, plus float32 master weights of them when any parameter is
not float32 (bf16 parameters: Megatron's distributed-optimizer layout). Per rank: 8*S + 4 bytes of optimizer
state (+ 4*S of master weights), which is what `ascend-llm plan` counts.

One optimizer call:
1. gradients to this rank's shard (`reduce_gradients`):
   stage 1: `grads` are already averaged over the group (the trainer's all-reduce): take the shard's slices;
   stage 2: `grads` are this rank's local gradients: flat vector, reduce-scatter (sum), divided by d, so only
   the shard of the average is kept (the trainer can accumulate micro-batches in this shard: 1/d memory);
   with `grad_clip` > 0 the shard is clipped by the global norm (sum of squares all-reduced over the group),
   since no rank holds the full gradient.
2. AdamW on the shard (`apply_shard`), exactly the unsharded formula of train/optim.py: m, v, bias
   correction, decoupled weight decay per parameter (norm weights and biases not decayed).
3. all-gather of the updated shards (in the parameter dtype) and assignment of every full parameter.
Collectives go through `ascend_llm.parallel.comm` (native HCCL ops on Ascend; exact AllReduce-based
equivalents on CPU).

Checkpoints stay layout-free: `full_state_dict()` gathers the shards and returns the same names and shapes
as the unsharded AdamW (`adam_step`, `adam_m.<param>`, `adam_v.<param>`, plus `master.<param>` when master
weights exist); `load_full_state_dict()` takes such a dict (from any degree, or one process) and keeps this
rank's shard. Both must run on every rank of the group.
"""

from __future__ import annotations

from math import ceil
from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.optim import OptimConfig
from ascend_llm.errors import CheckpointError, ConfigError
from ascend_llm.parallel import comm
from ascend_llm.train.optim import decays


def shard_segments(sizes: list[int], rank: int, shard: int) -> list[tuple[int, int, int]]:
    """The pieces of the flat vector rank `rank` owns: (param index, start, stop) within each parameter's
    flattened elements, in order. Shard of length `shard`; the pieces may leave a zero-padded tail."""
    lo, hi = rank * shard, (rank + 1) * shard
    out, offset = [], 0
    for index, size in enumerate(sizes):
        start, stop = max(lo, offset), min(hi, offset + size)
        if start < stop:
            out.append((index, start - offset, stop - offset))
        offset += size
    return out


class ZeroAdamW(nn.Cell):
    """AdamW whose state is sharded over `group` (default: the world). See the module doc.

    params: the full, replicated trainable parameters (any float dtype); cfg: OptimConfig; stage: 1 or 2;
    grad_clip: global-norm clip applied inside at stage 2 (at stage 1 the trainer clips the reduced
    gradients as today). Raises ConfigError for another stage.
    """

    def __init__(self, params: list[Parameter], cfg: OptimConfig, stage: int, group: Optional[Any] = None,
                 grad_clip: float = 0.0):
        super().__init__(auto_prefix=False)
        if stage not in (1, 2):
            raise ConfigError("parallel.zero_stage", stage, "ZeroAdamW implements stages 1 and 2")
        self.group = group if group is not None else comm.world_group()
        self.stage, self.size, self.rank = stage, self.group.size, self.group.rank
        self.params = tuple(params)
        self.sizes = [int(np.prod(p.shape)) for p in params]
        self.total = sum(self.sizes)
        self.shard = ceil(self.total / self.size)
        self.pad = self.shard * self.size - self.total
        self.segments = shard_segments(self.sizes, self.rank, self.shard)
        self.tail = self.shard - sum(stop - start for _, start, stop in self.segments)
        self.beta1, self.beta2, self.eps = cfg.beta1, cfg.beta2, cfg.eps
        self.decay = tuple(cfg.weight_decay if decays(params[i].name) else 0.0 for i, _, _ in self.segments)
        self.grad_clip = float(grad_clip) if stage == 2 else 0.0
        self.has_master = any(p.dtype != mstype.float32 for p in params)
        zeros = np.zeros(self.shard, np.float32)
        self.exp_avg = Parameter(Tensor(zeros), name="zero_m", requires_grad=False)
        self.exp_avg_sq = Parameter(Tensor(zeros.copy()), name="zero_v", requires_grad=False)
        self.step = Parameter(Tensor(0, mstype.int32), name="adam_step", requires_grad=False)
        if self.has_master:
            self.master = Parameter(Tensor(self._local_shard([p.asnumpy() for p in params])), name="zero_master",
                                    requires_grad=False)
        self.scatter = comm.ReduceScatter(self.group, 0)
        self.gather = comm.AllGather(self.group, 0)
        self.sum = comm.AllReduce(self.group, "sum")
        # Gather in the parameter dtype on Ascend (half the traffic for bf16); float32 on CPU, whose
        # StridedSlice kernel has no bf16.
        uniform = len({p.dtype for p in params}) == 1
        native = ms.get_context("device_target") == "Ascend"
        self.gather_dtype = params[0].dtype if (uniform and native) else mstype.float32

    def state_parameters(self) -> list[Parameter]:
        """This rank's optimizer state (step, m and v shards, master shard when present)."""
        return [self.step, self.exp_avg, self.exp_avg_sq] + ([self.master] if self.has_master else [])

    def state_bytes(self) -> int:
        return sum(int(np.prod(p.shape)) * p.itemsize for p in self.state_parameters())

    # -- compiled pieces ---------------------------------------------------------------------------------
    def _shard_of(self, tensors, dtype):
        pieces = ()
        for k in range(len(self.segments)):
            index, start, stop = self.segments[k]
            pieces = pieces + (tensors[index].reshape(-1).astype(dtype)[start:stop],)  # CPU slices no bf16
        if self.tail:
            pieces = pieces + (ops.zeros((self.tail,), dtype),)
        return ops.concat(pieces, 0)

    def reduce_gradients(self, grads):
        """(full gradients,) -> this rank's float32 shard of the group-average gradient (see module doc)."""
        if self.stage == 1:
            return self._shard_of(grads, mstype.float32)
        flat = ()
        for g in grads:
            flat = flat + (g.reshape(-1).astype(mstype.float32),)
        if self.pad:
            flat = flat + (ops.zeros((self.pad,), mstype.float32),)
        return self.scatter(ops.concat(flat, 0)) * (1.0 / self.size)

    def clip_shard(self, g_shard):
        """Global-norm clipping of a gradient shard (stage 2); returns (clipped shard, global norm)."""
        norm = ops.sqrt(self.sum((g_shard * g_shard).sum().reshape(1)))[0]
        if self.grad_clip <= 0:
            return g_shard, norm
        return g_shard * ops.minimum(self.grad_clip / (norm + 1e-6), 1.0), norm

    def apply_shard(self, g_shard, lr):
        """AdamW on this rank's shard, then all-gather and assign the full parameters. Returns the step."""
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(mstype.float32)
        bias1 = 1.0 - ops.pow(self.beta1, t)
        bias2 = 1.0 - ops.pow(self.beta2, t)
        m = self.exp_avg * self.beta1 + g_shard * (1.0 - self.beta1)
        v = self.exp_avg_sq * self.beta2 + g_shard * g_shard * (1.0 - self.beta2)
        ops.assign(self.exp_avg, m)
        ops.assign(self.exp_avg_sq, v)
        update = (m / bias1) / (ops.sqrt(v / bias2) + self.eps)
        current = self.master if self.has_master else self._shard_of(self.params, mstype.float32)
        pieces, offset = (), 0
        for k in range(len(self.segments)):
            _, start, stop = self.segments[k]
            n = stop - start
            pieces = pieces + (current[offset:offset + n] * (1.0 - lr * self.decay[k])
                               - lr * update[offset:offset + n],)
            offset += n
        if self.tail:
            pieces = pieces + (ops.zeros((self.tail,), mstype.float32),)
        new = ops.concat(pieces, 0)
        if self.has_master:
            ops.assign(self.master, new)
        full = self.gather(new.astype(self.gather_dtype))
        offset = 0
        for i in range(len(self.params)):
            param = self.params[i]
            ops.assign(param, full[offset:offset + self.sizes[i]].reshape(param.shape).astype(param.dtype))
            offset += self.sizes[i]
        return step

    def construct(self, grads, lr):
        g_shard = self.reduce_gradients(grads)
        if self.stage == 2:
            g_shard, _ = self.clip_shard(g_shard)
        return self.apply_shard(g_shard, lr)

    # -- layout-free state ---------------------------------------------------------------------------------
    def _local_shard(self, arrays: list[np.ndarray]) -> np.ndarray:
        flat = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays] +
                              [np.zeros(self.pad, np.float32)])
        return flat[self.rank * self.shard:(self.rank + 1) * self.shard].copy()

    def _gather_full(self, shard: Parameter) -> list[np.ndarray]:
        full = self.gather(shard.value()).asnumpy()[:self.total]
        out, offset = [], 0
        for p, size in zip(self.params, self.sizes):
            out.append(full[offset:offset + size].reshape(p.shape))
            offset += size
        return out

    def full_state_dict(self) -> dict[str, np.ndarray]:
        """The unsharded AdamW's state names and shapes (float32); collective: call on every rank."""
        out = {"adam_step": self.step.asnumpy()}
        for prefix, shard in (("adam_m.", self.exp_avg), ("adam_v.", self.exp_avg_sq)) + (
                (("master.", self.master),) if self.has_master else ()):
            for p, value in zip(self.params, self._gather_full(shard)):
                out[prefix + p.name] = value
        return out

    def load_full_state_dict(self, state: dict[str, np.ndarray], source: str = "optimizer state") -> None:
        """Keep this rank's shard of a full (layout-free) state; CheckpointError names a missing or misshaped
        entry. Master weights absent from `state` are taken from the current parameters."""
        if "adam_step" not in state:
            raise CheckpointError(source, "adam_step", "missing from the optimizer state")
        self.step.set_data(Tensor(np.asarray(state["adam_step"], np.int32).reshape(()), mstype.int32))
        for prefix, shard in (("adam_m.", self.exp_avg), ("adam_v.", self.exp_avg_sq)):
            shard.set_data(Tensor(self._local_shard(self._entries(state, prefix, source))))
        if self.has_master:
            if all("master." + p.name in state for p in self.params):
                arrays = self._entries(state, "master.", source)
            else:
                arrays = [p.asnumpy() for p in self.params]
            self.master.set_data(Tensor(self._local_shard(arrays)))

    def _entries(self, state: dict, prefix: str, source: str) -> list[np.ndarray]:
        arrays = []
        for p in self.params:
            name = prefix + p.name
            if name not in state:
                raise CheckpointError(source, name, "missing from the optimizer state (different model?)")
            if tuple(state[name].shape) != tuple(p.shape):
                raise CheckpointError(f"{source}:{name}", tuple(state[name].shape), f"shape must be {tuple(p.shape)}")
            arrays.append(state[name])
        return arrays
