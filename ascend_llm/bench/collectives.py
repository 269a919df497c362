"""Communication time of a training step, measured by recording the step's collectives and replaying them alone.

`record_collectives()` is a context manager that, while open, wraps the `__call__` of MindSpore's collective
primitives (AllReduce, AllGather, ReduceScatter, Broadcast) so that every call made in PyNative mode is appended
to a list as `Collective(primitive, kind, group, shape, dtype, num_bytes)`, and then runs as usual. One eager
(PyNative) training step issued under it yields the exact sequence of collectives that step puts on the wire:
what `parallel/comm.py` emits on this backend (on CPU, a sub-group all-gather appears as the AllReduce of the
zero-padded buffer it really is), including those in custom backward functions. Nothing is changed on the hot
path: compiled (graph-mode) steps never call `__call__`, and the wrappers are removed when the block exits.

`CollectiveReplay(records)` is a cell that issues the same primitives, in the same order, on zero tensors of the
recorded shapes and dtypes, each chained to the previous one by a data dependency (`ops.depend`), so every rank
issues them in the same order; `time_replay(records, repeats)` compiles it (graph mode) and returns the median
milliseconds per replay of the whole sequence, i.e. the communication time of one step with no computation in
between. It runs on every rank of the job (the collectives need their peers).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("AllReduce", "AllGather", "ReduceScatter", "Broadcast")


@dataclass(frozen=True)
class Collective:
    """One collective call: `kind` (primitive name), `group` (MindSpore group name), `shape`/`dtype` of the
    input, `num_bytes` the input's size in bytes; `primitive` is the instance that was called."""

    primitive: Any
    kind: str
    group: str
    shape: tuple[int, ...]
    dtype: Any
    num_bytes: int


def _input_of(kind: str, args: tuple):
    """The tensor a collective primitive was called with (Broadcast takes a tuple of tensors)."""
    x = args[0]
    if kind == "Broadcast" and isinstance(x, (tuple, list)):
        x = x[0]
    return x


@contextmanager
def record_collectives():
    """Yield a list that fills with a `Collective` per PyNative collective call made inside the block."""
    from mindspore import ops

    calls: list[Collective] = []
    originals = {}
    for kind in KINDS:
        cls = getattr(ops, kind)
        originals[cls] = cls.__dict__.get("__call__")
        parent = cls.__call__

        def wrapped(self, *args, _kind=kind, _parent=parent):
            x = _input_of(_kind, args)
            shape = tuple(int(d) for d in x.shape)
            calls.append(Collective(self, _kind, str(self.get_attr_dict().get("group", "")), shape, x.dtype,
                                    int(np.prod(shape, dtype=np.int64)) * x.itemsize))
            return _parent(self, *args)

        cls.__call__ = wrapped
    try:
        yield calls
    finally:
        for cls, original in originals.items():
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original


def summarize(calls: list[Collective]) -> dict:
    """{"num_calls", "num_bytes", "by_kind": {"AllReduce": n, ...}, "sequence": [[kind, group, shape], ...]} of a
    recorded sequence."""
    return {"num_calls": len(calls), "num_bytes": int(sum(c.num_bytes for c in calls)),
            "by_kind": dict(Counter(c.kind for c in calls)),
            "sequence": [[c.kind, c.group, list(c.shape)] for c in calls]}


def _replay_cell(calls: list[Collective]):
    from mindspore import nn, ops

    class _One(nn.Cell):
        def __init__(self, primitive, is_broadcast: bool):
            super().__init__()
            self.op, self.is_broadcast = primitive, is_broadcast

        def construct(self, x):
            if self.is_broadcast:
                return self.op((x,))[0]
            return self.op(x)

    class CollectiveReplay(nn.Cell):
        """(zero inputs...) -> the last collective's output; each call waits for the previous one's result."""

        def __init__(self):
            super().__init__()
            self.steps = nn.CellList([_One(c.primitive, c.kind == "Broadcast") for c in calls])

        def construct(self, *inputs):
            out = inputs[0]
            for i, step in enumerate(self.steps):
                out = step(ops.depend(inputs[i], out))
            return out

    return CollectiveReplay()


def time_replay(calls: list[Collective], repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds for one replay of `calls` (compiled, graph mode); 0.0 when there are none."""
    if not calls:
        return 0.0
    import mindspore as ms
    from mindspore import Tensor

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        replay = _replay_cell(calls)
        inputs = tuple(Tensor(np.zeros(c.shape, ms.dtype_to_nptype(c.dtype))) for c in calls)
        for _ in range(warmup):
            replay(*inputs).asnumpy()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            replay(*inputs).asnumpy()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        ms.set_context(mode=previous)
    return statistics.median(times)
