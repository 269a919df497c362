"""Checks that need the file system or the host, run once before a job starts (by `train` and `launch`).

The recipe schemas in `config/` are pure arithmetic; everything that opens a file (the HCCL rank table)
lives here so `config/` stays the ground floor of the import graph.
"""

from __future__ import annotations

from ascend_llm.config.root import RecipeConfig
from ascend_llm.errors import ConfigError, RankTableError


def check_rank_table(cluster, prefix: str = "cluster") -> None:
    """Raise ConfigError unless cluster.rank_table_file (when set) loads and matches num_nodes and
    num_workers_per_node."""
    if not cluster.rank_table_file:
        return
    from ascend_llm.cluster.rank_table import load_rank_table, resolve_rank_table_path

    try:
        path = resolve_rank_table_path(cluster.rank_table_file, field=f"{prefix}.rank_table_file")
    except RankTableError as exc:
        raise ConfigError(exc.field, exc.value, exc.allowed) from None
    try:
        table = load_rank_table(path)
    except RankTableError as exc:
        raise ConfigError(f"{prefix}.rank_table_file", str(path), f"invalid rank table: {exc}") from None
    if table.num_servers != cluster.num_nodes:
        raise ConfigError(f"{prefix}.num_nodes", cluster.num_nodes,
                          f"must equal the rank table's server_count={table.num_servers} ({path})")
    for index, server in enumerate(table.servers):
        if len(server.devices) != cluster.num_workers_per_node:
            raise ConfigError(f"{prefix}.num_workers_per_node", cluster.num_workers_per_node,
                              f"must equal the number of devices of every server in the rank table; "
                              f"server_list[{index}] ({server.server_id}) has {len(server.devices)} ({path})")


def preflight(recipe: RecipeConfig) -> RecipeConfig:
    """Validate the recipe (pure checks), the rank table, and whether the recipe fits in device memory (the
    planner's check: active when the cluster declares `device_memory_gib`, as the 910B clusters do; skipped with
    train.memory_check=false). Raises ConfigError naming the field, or the shortfall and the first change that
    fits."""
    recipe.validate()
    check_rank_table(recipe.cluster)
    from ascend_llm.parallel.plan import check_fits  # pure arithmetic: no MindSpore, no collectives

    check_fits(recipe)
    return recipe
