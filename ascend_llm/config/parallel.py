"""Parallel degrees (recipe group `parallel/`) and cluster hardware (recipe group `cluster/`)."""

from __future__ import annotations

from dataclasses import dataclass

from ascend_llm.config.checks import positive


@dataclass
class ParallelConfig:
    data_parallel_degree: int = 1

    @property
    def world_size(self) -> int:
        return self.data_parallel_degree

    def validate(self, prefix: str = "parallel") -> None:
        positive(f"{prefix}.data_parallel_degree", self.data_parallel_degree)


@dataclass
class ClusterConfig:
    name: str = "cpu_1proc"
    num_nodes: int = 1
    num_workers_per_node: int = 1

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.num_workers_per_node

    def validate(self, prefix: str = "cluster") -> None:
        positive(f"{prefix}.num_nodes", self.num_nodes)
        positive(f"{prefix}.num_workers_per_node", self.num_workers_per_node)
