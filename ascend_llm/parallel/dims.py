"""Parallel degree checks: world size = product of the `*_degree` fields, which must equal the cluster's
num_nodes * num_workers_per_node; each rank's coordinate along each degree.

Only data parallel exists today; the helpers work on every `*_degree` field of ParallelConfig so later
degrees (tensor, pipeline, context) plug in without changing callers. Plain-Python (no MindSpore import).
"""

from __future__ import annotations

from typing import Any

from ascend_llm.config.parallel import check_world_size  # noqa: F401  (re-exported: one definition)
from ascend_llm.errors import ConfigError


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
