"""The communication layer: the only module that calls collectives. Used by dp, tp, cp and the sharded optimizer.

API (stable; other branches merge it):

- `Group(name, ranks, rank)`: a communicator. `ranks` are world ranks in group order, `rank` is this
  process's index in `ranks`, `size == len(ranks)`. A group of size 1 needs no initialised communication and
  every operation over it is the identity (so single-process code runs the same cells).
- `world_group() -> Group`: every rank (size 1 when communication is not initialised).
- `new_group(name, ranks) -> Group`: the group `ranks` (world ranks, group order), which must contain this
  process's rank: the world group when `ranks` is every rank in order, else
  `mindspore.communication.create_group(name, ranks)` when size > 1 (every member must call it, in the same
  order, and non-members must not). A name this process has already created is reused (same communicator;
  ConfigError if the ranks differ), so a second run in the same process may ask for its groups again.
- Cells, usable inside `ms.jit` and in pynative mode; each has a custom backward (`bprop`) following the
  "total loss = sum of the per-rank losses" convention, i.e. the backward is the adjoint collective:

  | cell | forward (x: this rank's tensor) | backward (dout -> dx) |
  |---|---|---|
  | `AllReduce(group, op="sum")` | sum over the group | `AllReduce` sum of dout |
  | `AllReduce(group, op="max")` | element-wise max over the group | zero (not differentiable; for amax) |
  | `AllGather(group, axis=0)` | concat of every rank's x along `axis`, group order | `ReduceScatter(dout)` |
  | `ReduceScatter(group, axis=0)` | this rank's `1/size` slice along `axis` of the sum | `AllGather(dout)` |
  | `Broadcast(group, root=0)` | the group-rank `root`'s x on every rank | sum of dout on root, 0 elsewhere |
  | `AllToAll(group)` | x cut in `size` chunks (axis 0): chunk j to rank j; out chunk j from rank j | `AllToAll(dout)` |

  Shapes: AllGather multiplies `x.shape[axis]` by size; ReduceScatter divides it (it must be divisible).
  dtypes are preserved; use float dtypes (MCCL sums float32/float16/int32 exactly as the hardware adds).
- Functions `all_reduce(x, group, op)`, `all_gather(x, group, axis)`, `reduce_scatter(x, group, axis)`,
  `broadcast(x, group, root)`: eager (pynative) convenience that build the cell and call it; inside compiled
  code hold the cells as attributes instead.

Backends. On Ascend (device_target "Ascend") the cells call the native HCCL operators (AllReduce SUM/MAX,
AllGather, ReduceScatter, Broadcast) on any group. On CPU, MindSpore 2.10's MCCL has AllReduce (SUM only, any
group) and AllGather (world group only), and no ReduceScatter (probes README q7, q13), so the cells use exact
equivalents built from AllReduce-sum:
  all_gather on a sub-group = every rank writes x at its offset of a zero buffer, AllReduce-sum (x + 0 = x);
  reduce_scatter = AllReduce-sum, then this rank's slice;
  broadcast = AllReduce-sum of (x on root, zeros elsewhere);
  max = all_gather of x[None], then max over the new axis;
  all_to_all = all_gather of x, then chunk `rank` of every rank's block (Ascend: native AlltoAll).
They move `size` times more data than the native ops: fine for CPU tests, never used on Ascend.

Ordering rule (both backends): every rank must issue the same collectives in the same order. Inside one
compiled graph two collectives with no data dependency may run in either order, so a cell that issues several
independent ones must chain them (or pack them into one tensor), and a caller must not launch a second
graph holding collectives while the first is still running (synchronise with `.asnumpy()` or a data
dependency between the graphs). A collective whose result a rank does not use is removed by dead-code
elimination on that rank only: keep it alive with `ops.depend` (as `Broadcast`'s backward does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn, ops

from ascend_llm.errors import ConfigError

OPS = ("sum", "max")
_created: dict[str, tuple[int, ...]] = {}  # group name -> ranks, for the groups create_group made in this process


@dataclass(frozen=True)
class Group:
    """A communicator: `name` (MindSpore group name), `ranks` (world ranks, group order), `rank` (this process's
    index in `ranks`)."""

    name: str
    ranks: tuple[int, ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_world(self) -> bool:
        from mindspore.communication import GlobalComm

        return self.name == GlobalComm.WORLD_COMM_GROUP


def _world() -> tuple[int, int]:
    from mindspore.communication import GlobalComm, get_group_size, get_rank

    if not GlobalComm.INITED:
        return 0, 1
    return int(get_rank()), int(get_group_size())


def world_group() -> Group:
    """All ranks; when communication is not initialised, the single-process group (size 1)."""
    from mindspore.communication import GlobalComm

    rank, size = _world()
    return Group(GlobalComm.WORLD_COMM_GROUP, tuple(range(size)), rank)


def new_group(name: str, ranks: Sequence[int]) -> Group:
    """Create (size > 1) or describe (size 1) the group `ranks`; this process must be one of them. A `name`
    already created in this process is reused; ConfigError if it was created with other ranks."""
    rank, size = _world()
    ranks = tuple(int(r) for r in ranks)
    if rank not in ranks:
        raise ConfigError("group ranks", list(ranks), f"must contain this process's rank {rank}")
    if len(set(ranks)) != len(ranks) or not all(0 <= r < size for r in ranks):
        raise ConfigError("group ranks", list(ranks), f"must be distinct ranks in 0..{size - 1}")
    if len(ranks) == size > 1 and ranks == tuple(range(size)):
        return world_group()
    if len(ranks) > 1 and name in _created:
        if _created[name] != ranks:
            raise ConfigError("group ranks", list(ranks), f"group {name!r} already holds ranks {list(_created[name])}")
    elif len(ranks) > 1:
        from mindspore.communication import create_group

        create_group(name, list(ranks))
        _created[name] = ranks
    return Group(name, ranks, ranks.index(rank))


def _native() -> bool:
    import mindspore as ms

    return ms.get_context("device_target") == "Ascend"


class _Prim(nn.Cell):
    """Shared set-up of the building blocks (which have no custom backward)."""

    def __init__(self, group: Group):
        super().__init__()
        self.single, self.size, self.rank = group.size == 1, group.size, group.rank
        self.ranks, self.is_world = group.ranks, group.size > 1 and group.is_world
        self.native = not self.single and _native()


class _SumPrim(_Prim):
    """AllReduce-sum over the group (HCCL or MCCL, any group)."""

    def __init__(self, group: Group):
        super().__init__(group)
        if not self.single:
            self.op = ops.AllReduce(ops.ReduceOp.SUM, group.name)

    def construct(self, x):
        if self.single:
            return x
        return self.op(x)


class _GatherPrim(_Prim):
    """All-gather along `axis` (group order): native AllGather (Ascend; the CPU world group) or, on a CPU
    sub-group, x written at this rank's offset of a zero buffer and AllReduce-summed."""

    def __init__(self, group: Group, axis: int = 0):
        super().__init__(group)
        self.axis = axis
        self.use_gather = self.native or self.is_world
        if self.use_gather:
            self.op = ops.AllGather(group.name)
        elif not self.single:
            self.op = ops.AllReduce(ops.ReduceOp.SUM, group.name)

    def construct(self, x):
        if self.single:
            return x
        axis = self.axis % x.ndim
        if self.use_gather:
            gathered = self.op(x)  # ranks stacked along axis 0
            if axis == 0:
                return gathered
            return ops.concat(ops.split(gathered, x.shape[0], 0), axis)
        zeros = ops.zeros(x.shape, x.dtype)
        pieces = ()
        for i in range(self.size):
            pieces = pieces + ((x,) if i == self.rank else (zeros,))
        return self.op(ops.concat(pieces, axis))  # x + 0 = x exactly


class _MaxPrim(_Prim):
    """Element-wise max over the group: native AllReduce(MAX) on Ascend, max over an all-gather on CPU (MCCL's
    AllReduce is SUM-only)."""

    def __init__(self, group: Group):
        super().__init__(group)
        if self.native:
            self.op = ops.AllReduce(ops.ReduceOp.MAX, group.name)
        elif not self.single:
            self.gather = _GatherPrim(group, 0)

    def construct(self, x):
        if self.single:
            return x
        if self.native:
            return self.op(x)
        return self.gather(x.expand_dims(0)).max(axis=0)


class _ScatterPrim(_Prim):
    """Reduce-scatter (sum) along `axis`: native ReduceScatter (Ascend) or AllReduce-sum, then this rank's slice."""

    def __init__(self, group: Group, axis: int = 0):
        super().__init__(group)
        self.axis = axis
        if self.native:
            self.op = ops.ReduceScatter(ops.ReduceOp.SUM, group.name)
        elif not self.single:
            self.op = ops.AllReduce(ops.ReduceOp.SUM, group.name)

    def construct(self, x):
        if self.single:
            return x
        axis = self.axis % x.ndim
        if self.native:
            if axis == 0:
                return self.op(x)
            stacked = ops.concat(ops.split(x, x.shape[axis] // self.size, axis), 0)  # rank chunks along axis 0
            return self.op(stacked)
        chunk = x.shape[axis] // self.size
        return ops.narrow(self.op(x), axis, self.rank * chunk, chunk)


class AllReduce(nn.Cell):
    """Sum or element-wise max over `group`; see the module table for the backward."""

    def __init__(self, group: Group, op: str = "sum"):
        super().__init__()
        if op not in OPS:
            raise ConfigError("all_reduce op", op, f"allowed: {', '.join(OPS)}")
        self.is_max = op == "max"
        self.sum = _SumPrim(group)
        if self.is_max:
            self.max = _MaxPrim(group)

    def construct(self, x):
        if self.is_max:
            return self.max(x)
        return self.sum(x)

    def bprop(self, x, out, dout):
        if self.is_max:
            return (ops.zeros_like(x),)
        return (self.sum(dout),)


class AllGather(nn.Cell):
    """Concatenate every rank's x along `axis` (group order); backward = reduce-scatter of the gradient."""

    def __init__(self, group: Group, axis: int = 0):
        super().__init__()
        self.gather = _GatherPrim(group, axis)
        self.scatter = _ScatterPrim(group, axis)

    def construct(self, x):
        return self.gather(x)

    def bprop(self, x, out, dout):
        return (self.scatter(dout),)


class ReduceScatter(nn.Cell):
    """This rank's slice (along `axis`) of the sum over `group`; backward = all-gather of the gradient."""

    def __init__(self, group: Group, axis: int = 0):
        super().__init__()
        self.gather = _GatherPrim(group, axis)
        self.scatter = _ScatterPrim(group, axis)

    def construct(self, x):
        return self.scatter(x)

    def bprop(self, x, out, dout):
        return (self.gather(dout),)


class Broadcast(nn.Cell):
    """Group-rank `root`'s x on every rank; backward = sum of the gradients on root, zeros elsewhere."""

    def __init__(self, group: Group, root: int = 0):
        super().__init__()
        if not 0 <= root < group.size:
            raise ConfigError("broadcast root", root, f"must be a group rank in 0..{group.size - 1}")
        self.single, self.is_root = group.size == 1, group.rank == root
        self.native = not self.single and _native()
        self.sum = _SumPrim(group)
        if self.native:
            self.op = ops.Broadcast(group.ranks[root], group.name)  # root_rank is a global rank

    def construct(self, x):
        if self.single:
            return x
        if self.native:
            return self.op((x,))[0]
        if self.is_root:
            return self.sum(x)
        return self.sum(ops.zeros(x.shape, x.dtype))

    def bprop(self, x, out, dout):
        total = self.sum(dout)
        if self.is_root:
            return (total,)
        # depend: the non-root ranks must still run the AllReduce (dead-code elimination would drop it and
        # leave the root waiting in a collective its peers never join)
        return (ops.depend(ops.zeros(total.shape, total.dtype), total),)


class AllToAll(nn.Cell):
    """All-to-all exchange along axis 0 (expert-parallel dispatch and combine): x (size * C, ...) is cut into
    `size` chunks, chunk j goes to group rank j, and the output's chunk j is the chunk group rank j sent here.
    Native AlltoAll on Ascend; on CPU an exact equivalent: all-gather of x, then chunk `rank` of each rank's
    block (size times the traffic). A permutation of the group's data, so the backward is the same exchange of
    the gradient. Float or int32 tensors; x.shape[0] must be divisible by size."""

    def __init__(self, group: Group):
        super().__init__()
        self.single, self.size, self.rank = group.size == 1, group.size, group.rank
        self.native = not self.single and _native()
        if self.native:
            self.op = ops.AlltoAll(group.size, 0, 0, group.name)
        elif not self.single:
            self.gather = _GatherPrim(group, 0)

    def exchange(self, x):
        """The forward (also used by the backward)."""
        if self.single:
            return x
        if self.native:
            return self.op(x)
        chunk = x.shape[0] // self.size
        blocks = self.gather(x).reshape((self.size, self.size, chunk) + x.shape[1:])  # (source, target, ...)
        return blocks[:, self.rank].reshape(x.shape)

    def construct(self, x):
        return self.exchange(x)

    def bprop(self, x, out, dout):
        return (self.exchange(dout),)


_eager: dict[tuple, nn.Cell] = {}


def _cell(cls: type, group: Group, arg) -> nn.Cell:
    """One cell per (collective, group, argument) for the eager calls: in graph mode a call compiles a graph per
    new cell (and per new input shape), so a cached cell compiles each shape once per process."""
    key = (cls, group, arg)
    if key not in _eager:
        _eager[key] = cls(group) if arg is None else cls(group, arg)
    return _eager[key]


def all_to_all(x, group: Group):
    """Eager convenience: `AllToAll(group)(x)` (one cached cell per group)."""
    return _cell(AllToAll, group, None)(x)


def all_reduce(x, group: Group, op: str = "sum"):
    """Eager convenience: `AllReduce(group, op)(x)` (one cached cell per group and op)."""
    return _cell(AllReduce, group, op)(x)


def all_gather(x, group: Group, axis: int = 0):
    """Eager convenience: `AllGather(group, axis)(x)` (one cached cell per group and axis)."""
    return _cell(AllGather, group, axis)(x)


def reduce_scatter(x, group: Group, axis: int = 0):
    """Eager convenience: `ReduceScatter(group, axis)(x)` (one cached cell per group and axis)."""
    return _cell(ReduceScatter, group, axis)(x)


def broadcast(x, group: Group, root: int = 0):
    """Eager convenience: `Broadcast(group, root)(x)` (one cached cell per group and root)."""
    return _cell(Broadcast, group, root)(x)


GATHER_BUCKET = 1 << 26  # elements per all-gather of gather_arrays (256 MiB of float32 on each rank)


def _buckets(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indices of `sizes` in consecutive runs of at most `limit` elements (an array larger than that alone)."""
    runs, current, total = [], [], 0
    for i, n in enumerate(sizes):
        if current and total + n > limit:
            runs.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    return runs + [current] if current else runs


def gather_arrays(arrays: Sequence[np.ndarray], group: Group, axes: Sequence[int]) -> list[np.ndarray]:
    """Every rank's `arrays[i]` concatenated along `axes[i]` in group order, for many arrays at once (a checkpoint's
    shards): the arrays of one dtype are flattened into buffers of at most GATHER_BUCKET elements, each
    all-gathered in one call of a cached AllGather over `group`; a checkpoint of N shards then compiles one
    graph per buffer length (once per process) and launches a few collectives instead of N.

    arrays: NumPy arrays (any dtype MCCL/HCCL gathers; same shapes and dtypes, same order on every rank: a
    collective). axes: per array, the axis to concatenate along. Returns NumPy arrays, shape[axes[i]] times
    group.size. A group of size 1 returns copies."""
    arrays = [np.asarray(a) for a in arrays]
    out: list[np.ndarray | None] = [None] * len(arrays)
    if group.size == 1:
        return [a.copy() for a in arrays]
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    for members in by_dtype.values():
        for run in _buckets([arrays[i].size for i in members], GATHER_BUCKET):
            idx = [members[j] for j in run]
            flat = np.concatenate([arrays[i].ravel() for i in idx])
            every = all_gather(Tensor(flat), group).asnumpy().reshape(group.size, flat.size)
            offset = 0
            for i in idx:
                a = arrays[i]
                parts = [every[r, offset:offset + a.size].reshape(a.shape) for r in range(group.size)]
                out[i] = np.concatenate(parts, axis=axes[i])
                offset += a.size
    return out
