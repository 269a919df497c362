"""The stateful parts of a training run and their one lifecycle: `state_dict()` / `load_state_dict()`.

A checkpoint (`train/checkpoint.py`) is a dict of named parts. A part whose state is a dict of NumPy arrays
is stored in its own safetensors file (`<name>.safetensors`); a part whose state is JSON-able scalars is stored
in `state.json`. Parts never know where they are stored; the checkpoint manager never knows what they hold.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from mindspore import Parameter, Tensor, ops

from ascend_llm.errors import CheckpointError


@runtime_checkable
class Stateful(Protocol):
    """Anything a checkpoint holds (model, optimizer, data position, precision runtime, run metadata)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ParameterState:
    """Parameters by full name (layout-free: names and shapes of the unsharded model).

    state_dict() -> {name: float32/int32 ndarray}. load_state_dict() writes in place (`ops.assign`), so it is
    correct before or after the step functions are compiled; it raises CheckpointError naming the parameter
    when one is missing or has another shape (a different model).

    With tensor parallel (`sharding`, a `train.layout.TPSharding`), the parameters are this rank's shards:
    `collect()` (every TP rank, same order: it all-gathers) gathers the full, unpadded arrays and the next
    state_dict() returns them; load_state_dict() checks the full shapes, then assigns this rank's shards
    (`parallel.tp.shard_full`)."""

    def __init__(self, params: list[Parameter], what: str, sharding: Any = None):
        self.params = list(params)
        self.what = what
        self.sharding = sharding
        self._collected: dict[str, np.ndarray] | None = None

    def collect(self) -> None:
        """Gather the full tensors across TP (a collective: every TP rank calls it); no-op without TP."""
        if self.sharding is None:
            return
        from ascend_llm.parallel.tp import gather_full

        sh = self.sharding
        axes = {p.name: sh.axis(p.name) for p in self.params}
        shapes = {p.name: sh.full_shape(p.name, p.shape) for p in self.params}
        full = gather_full({p.name: p for p in self.params}, axes, sh.group, shapes,
                           {p.name: sh.num_replicas(p.name) for p in self.params})
        self._collected = {name: np.asarray(value) for name, value in full.items()}  # 0-d stays an ndarray

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.sharding is not None:
            if self._collected is None:
                raise RuntimeError(f"{self.what}: collect() must run on every TP rank before state_dict()")
            state, self._collected = self._collected, None
            return state
        return {p.name: p.asnumpy() for p in self.params}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        values = {}
        for p in self.params:
            if p.name not in state:
                raise CheckpointError(f"{self.what}:{p.name}", "missing",
                                      "the checkpoint has no such parameter (a different model?)")
            value = np.asarray(state[p.name])
            shape = self.sharding.full_shape(p.name, p.shape) if self.sharding is not None else tuple(p.shape)
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"{self.what}:{p.name}", tuple(value.shape),
                                      f"shape must be {tuple(shape)} (a different model?)")
            values[p.name] = value
        if self.sharding is not None:
            from ascend_llm.parallel.tp import shard_full

            sh = self.sharding
            values = shard_full(values, {n: sh.axis(n) for n in values}, sh.group.rank, sh.group.size,
                                {n: sh.num_replicas(n) for n in values})
        for p in self.params:
            ops.assign(p, Tensor(values[p.name], p.dtype))


class OptimizerState(ParameterState):
    """The optimizer's state by the unsharded AdamW's names and shapes (`adam_step`, `adam_m.<param>`,
    `adam_v.<param>`), whatever the sharding: a ZeRO optimizer gathers its shards (a collective: every rank
    calls state_dict) and keeps its own shard on load, so checkpoints move between stages and degrees."""

    def __init__(self, optimizer, sharding: Any = None):
        super().__init__(optimizer.state_parameters(), "optimizer", sharding)
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, np.ndarray]:
        if hasattr(self.optimizer, "full_state_dict"):
            return self.optimizer.full_state_dict()
        return super().state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if hasattr(self.optimizer, "load_full_state_dict"):
            self.optimizer.load_full_state_dict(state, source="optimizer.safetensors")
        else:
            super().load_state_dict(state)


@dataclass
class DataState:
    """Where the run is in its data: `position` counts training sequences consumed (all ranks, all
    micro-batches), so a resumed run continues at the same window even with another global batch size.
    `identity` says which data this is (tokenizer hash, seq_len, data seed, corpus key); the checkpoint
    manager compares it on restore."""

    identity: dict[str, Any]
    position: int = 0

    def advance(self, num_sequences: int) -> None:
        self.position += int(num_sequences)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, **self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@dataclass
class RunState:
    """Run metadata: a run id (a fresh run gets a new one; a resumed run keeps it), the seed, the step of the
    checkpoint, the last loss, and the resolved recipe (for the model-compatibility check and for export)."""

    config: dict[str, Any]
    seed: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    step: int = 0
    loss: float | None = None
    num_skipped_steps: int = 0  # optimizer steps skipped for non-finite loss or gradients, whole run

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "seed": self.seed, "step": self.step, "loss": self.loss,
                "num_skipped_steps": self.num_skipped_steps, "config": self.config}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id, self.step, self.loss = state["run_id"], int(state["step"]), state.get("loss")
        self.num_skipped_steps = int(state.get("num_skipped_steps", 0))
