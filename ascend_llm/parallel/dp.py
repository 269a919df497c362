"""Data parallel: communication init, gradient all-reduce (mean) and the main-rank test.

Contract used by the trainer (`ascend_llm.train.trainer`):

- `init_distributed(parallel_cfg, cluster_cfg) -> (rank, world_size)`.
  world_size is the product of `parallel_cfg`'s `*_degree` fields; ConfigError unless it equals
  `cluster_cfg.world_size` (num_nodes * num_workers_per_node). When it is 1 nothing is initialised and
  `(0, 1)` is returned. When it is > 1 the process must have been started by msrun (`MS_ROLE`,
  `MS_WORKER_NUM` set, and MS_WORKER_NUM == world_size) or in rank-table mode (`RANK_TABLE_FILE` +
  `RANK_ID`); otherwise LaunchError says how to launch (`ascend-llm launch ...`). Then it calls
  `mindspore.communication.init()` (HCCL on Ascend, MCCL on CPU) unless this process has already initialised
  communication (a second run in the same process, e.g. several recipes in one msrun job, reuses it), checks
  that the communicator's size equals
  world_size, and sets `ms.set_auto_parallel_context(parallel_mode=DATA_PARALLEL, gradients_mean=True,
  device_num=world_size)`. Call it right after the device/mode are set and before any data preparation or
  parameter creation: under msrun the same program also runs as the *scheduler* process, and for that
  process `init()` serves the cluster and exits the interpreter when the workers are done, so code placed
  before the call runs once more in the scheduler.
- `build_grad_reducer(params, world_size, group=None, scale=None) -> reduce`, where
  `reduce(tensors: tuple) -> tuple` returns each tensor's sum over `group` times `scale`; by default the
  element-wise mean over all ranks (world group, scale 1/world_size). With TP/CP: `group=groups.dp_cp`,
  `scale=1/data_parallel_degree` (see `parallel.dims`). The all-reduce is `parallel.comm.AllReduce`. Usable inside
  `ms.jit` (it is an `nn.Cell`) and in pynative mode; any tuple of tensors works (gradients, or `(loss,)`),
  so `params` may be None (it is accepted for symmetry with `nn.DistributedGradReducer`). Identity when
  world_size == 1.
- `is_main_rank() -> bool`: True on rank 0 and in single-process runs; metrics, checkpoints and samples are
  written by the main rank only.

Data parallel on CPU (MindSpore 2.10): msrun + `init()` uses MCCL; `ops.AllReduce` works in graph and
pynative mode, while semi-auto/auto parallel refuse the CPU backend. So the all-reduce is explicit here and
the same code runs on Ascend over HCCL. Identical initial parameters come from seeded NumPy init on every
rank; each rank takes its slice of every global batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable

from ascend_llm.errors import LaunchError

LAUNCH_HINT = ("launch it with `ascend-llm launch cluster=cpu_2proc parallel=dp2 ...` (msrun) or set "
               "parallel.data_parallel_degree=1 for a single process")


def launched_by_msrun() -> bool:
    return bool(os.environ.get("MS_ROLE")) and bool(os.environ.get("MS_WORKER_NUM"))


def launched_by_rank_table() -> bool:
    return bool(os.environ.get("RANK_TABLE_FILE")) and bool(os.environ.get("RANK_ID"))


def _check_launch_env(world_size: int) -> None:
    if launched_by_msrun():
        workers = os.environ["MS_WORKER_NUM"]
        if workers != str(world_size):
            raise LaunchError("MS_WORKER_NUM", workers,
                              f"msrun started {workers} workers but the recipe's world size is {world_size}; "
                              "launch with `ascend-llm launch` so the two agree")
        return
    if launched_by_rank_table():
        size = os.environ.get("RANK_SIZE")
        if size is not None and size != str(world_size):
            raise LaunchError("RANK_SIZE", size, f"must equal the recipe's world size {world_size}")
        return
    raise LaunchError("parallel world size", world_size,
                      "needs one process per rank, but this process was not started by msrun (no MS_ROLE / "
                      "MS_WORKER_NUM) nor in rank-table mode (no RANK_TABLE_FILE + RANK_ID): " + LAUNCH_HINT)


def init_distributed(parallel_cfg: Any, cluster_cfg: Any) -> tuple[int, int]:
    """Initialise communication when the world size is > 1; returns (rank, world_size). See the module doc."""
    from ascend_llm.parallel.dims import check_world_size

    world_size = check_world_size(parallel_cfg, cluster_cfg)
    if world_size == 1:
        return 0, 1
    _check_launch_env(world_size)
    import mindspore as ms
    from mindspore.communication import GlobalComm, get_group_size, get_rank, init
    from mindspore.context import ParallelMode

    if not GlobalComm.INITED:  # re-entrant: a later run in this process keeps the communicator
        init()  # the msrun scheduler process serves the cluster inside this call and then exits
    rank, size = get_rank(), get_group_size()
    if size != world_size:
        raise LaunchError("communicator size", size, f"must equal the recipe's world size {world_size}")
    ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=size)
    return rank, size


def identity(tensors: tuple) -> tuple:
    return tensors


def build_grad_reducer(params: Sequence[Any] | None, world_size: int, group: Any = None,
                       scale: float | None = None) -> Callable[[tuple], tuple]:
    """A callable `tuple of tensors -> tuple of (sum over `group`) * scale`; identity when nothing is reduced.

    Defaults (data parallel only): group = the world group, scale = 1/world_size (the mean over ranks).
    With tensor/context parallel pass `group=groups.dp_cp` (from `parallel.dims.build_groups`) and
    `scale=1/data_parallel_degree`: gradients are summed over the CP ranks (each holds its share of the loss)
    and averaged over the data-parallel replicas; TP ranks hold different shards and are not reduced.
    The all-reduce is `parallel.comm.AllReduce` (the one communication layer).
    """
    if group is None:
        if world_size == 1:
            return identity
        from ascend_llm.parallel.comm import world_group

        group = world_group()
    if group.size == 1 and (scale is None or scale == 1.0):
        return identity
    scale = 1.0 / world_size if scale is None else float(scale)
    from mindspore import nn, ops

    from ascend_llm.optim.each import each
    from ascend_llm.parallel.comm import AllReduce

    class ScaledAllReduce(nn.Cell):
        """AllReduce(sum) over the group, then multiply by `scale`; works inside ms.jit."""

        def __init__(self) -> None:
            super().__init__()
            self.all_reduce = AllReduce(group, "sum")
            self.scale = scale

        def construct(self, tensors):
            return each(ops.partial(_reduce_scaled, self.all_reduce, self.scale), tensors)

    return ScaledAllReduce()


def _reduce_scaled(all_reduce, scale, t):
    return all_reduce(t) * scale


def get_rank_or_zero() -> int:
    """This process's rank once communication is initialised, else 0."""
    try:
        from mindspore.communication import GlobalComm, get_rank
    except ImportError:  # pragma: no cover - mindspore is a dependency
        return 0
    if not GlobalComm.INITED:
        return 0
    return int(get_rank())


def is_main_rank() -> bool:
    """True on rank 0 and in single-process runs."""
    return get_rank_or_zero() == 0
