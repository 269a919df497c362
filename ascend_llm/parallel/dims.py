"""Layout over (dp, cp, tp) with tp innermost, and one communication group per axis.

rank = (dp_index * cp + cp_index) * tp + tp_index: the `*_degree` fields of ParallelConfig are declared
outermost first (data, context, tensor), and the last declared degree varies fastest. A rank's group along an
axis is every rank that shares its other coordinates, ordered by the index along that axis.

- `degrees`, `world_size`, `rank_coordinates`: plain Python (no MindSpore import).
- `axis_ranks(parallel, rank, axis)`: the world ranks of `rank`'s group along axis "dp" | "cp" | "tp" |
  "dp_cp" (dp and cp together: the gradient-reduce group of a context-parallel run).
- `describe_layout(parallel)`: one line per rank, "rank R: dp=i cp=j tp=k", for `launch` to print.
- `build_groups(parallel) -> ParallelGroups`: this rank's `comm.Group`s (created with create_group where
  needed); call after `init_distributed`, on every rank, before building the model. Calling it again (a later
  run in the same process) reuses the groups already created under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ascend_llm.config.parallel import check_world_size  # noqa: F401  (re-exported: one definition)
from ascend_llm.errors import ConfigError

AXES = {"dp": "data_parallel_degree", "cp": "context_parallel_degree", "tp": "tensor_parallel_degree"}


def degrees(parallel: Any) -> dict[str, int]:
    """{field name: degree} for every `*_degree` field, in declaration order."""
    return dict(parallel.degrees())


def world_size(parallel: Any) -> int:
    size = 1
    for degree in degrees(parallel).values():
        size *= int(degree)
    return size


def rank_coordinates(rank: int, parallel: Any) -> dict[str, int]:
    """This rank's index along each degree; the last declared degree varies fastest."""
    if not 0 <= rank < world_size(parallel):
        raise ConfigError("rank", rank, f"must be in 0..{world_size(parallel) - 1}")
    coords: dict[str, int] = {}
    for name, degree in reversed(list(degrees(parallel).items())):
        coords[name] = rank % degree
        rank //= degree
    return dict(reversed(list(coords.items())))


def _rank_of(coords: dict[str, int], parallel: Any) -> int:
    rank = 0
    for name, degree in degrees(parallel).items():
        rank = rank * int(degree) + coords[name]
    return rank


def axis_ranks(parallel: Any, rank: int, axis: str) -> list[int]:
    """World ranks of `rank`'s group along `axis` (dp, cp, tp or dp_cp), ordered by their index on it."""
    names = [AXES[a] for a in axis.split("_")] if axis in ("dp", "cp", "tp", "dp_cp") else None
    if names is None:
        raise ConfigError("axis", axis, "allowed: dp, cp, tp, dp_cp")
    ranks = [rank]
    for name in names:
        ranks = [_rank_of({**rank_coordinates(r, parallel), name: i}, parallel)
                 for r in ranks for i in range(int(getattr(parallel, name)))]
    return sorted(set(ranks), key=lambda r: tuple(rank_coordinates(r, parallel)[n] for n in names))


def describe_layout(parallel: Any) -> list[str]:
    """'rank R: dp=i cp=j tp=k' for every rank."""
    lines = []
    for rank in range(world_size(parallel)):
        c = rank_coordinates(rank, parallel)
        lines.append(f"rank {rank}: " + " ".join(f"{a}={c[f]}" for a, f in AXES.items()))
    return lines


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's communicators and coordinates. Groups of size 1 make every collective the identity."""

    rank: int
    dp: Any
    cp: Any
    tp: Any
    dp_cp: Any

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def cp_rank(self) -> int:
        return self.cp.rank

    @property
    def dp_rank(self) -> int:
        return self.dp.rank


def build_groups(parallel: Any) -> ParallelGroups:
    """This rank's dp, cp, tp and dp_cp groups (comm.Group). Every rank must call it (same order of creation)."""
    from ascend_llm.parallel import comm

    rank = comm.world_group().rank
    groups = {}
    for axis in ("dp", "cp", "tp", "dp_cp"):
        ranks = axis_ranks(parallel, rank, axis)
        groups[axis] = comm.new_group(f"{axis}_" + "_".join(map(str, ranks)), ranks)
    return ParallelGroups(rank=rank, **groups)
