"""Parallel degrees (recipe group `parallel/`) and cluster hardware and launch (recipe group `cluster/`).

`parallel/` says degrees only; the world size is the product of every `*_degree` field. `cluster/` says how
many nodes and workers per node, how they are launched (msrun's dynamic cluster or an HCCL rank table),
and the HCCL environment knobs. `RecipeConfig` checks that the two world sizes agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Optional

from ascend_llm.config.checks import in_range, non_negative, one_of, positive
from ascend_llm.errors import ConfigError

LAUNCHERS = ("msrun", "rank_table")
HCCL_DETERMINISTIC = ("false", "true", "strict")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


ZERO_STAGES = (0, 1, 2)


@dataclass
class ParallelConfig:
    """Degrees, declared outermost first: rank = (dp_index * cp + cp_index) * tp + tp_index (tp innermost)."""

    data_parallel_degree: int = 1  # 0: fill the world, cluster world size / (cp * tp) (recipes default to 0)
    context_parallel_degree: int = 1  # zigzag sequence split over 2*cp chunks, all-gathered keys/values
    tensor_parallel_degree: int = 1  # Megatron column/row-parallel projections, vocab-parallel head and loss
    sequence_parallel: bool = False  # norm regions sharded along the sequence over the TP group
    # ZeRO stage (Rajbhandari et al. 2020) over the ranks holding identical parameters, data x context parallel
    # for one tensor-parallel rank (Megatron's distributed optimizer): 0 replicated optimizer state,
    # 1 optimizer state (and fp32 master weights) sharded, 2 also the gradient-accumulation buffer sharded.
    zero_stage: int = 0
    # Expert parallel (Mixture-of-Experts; parallel/ep.py): each sparse layer's experts sharded over groups of
    # this many consecutive data-parallel ranks, tokens exchanged by all-to-all. Carved out of data parallel
    # (it must divide data_parallel_degree), so it is not a factor of the world size and not among degrees().
    expert_parallel_degree: int = 1
    # Expert-parallel chunk size per destination rank: 0 dropless (sized for the worst case, every pair to one
    # rank: exact, ep times the traffic of a balanced load); c > 0 holds ceil(c * pairs / ep) rows and drops the
    # pairs beyond it (GShard / Switch Transformer capacity factor).
    expert_capacity_factor: float = 0.0

    def degrees(self) -> dict[str, int]:
        """{field name: degree} for every `*_degree` field that multiplies into the world size, in declaration
        order (outermost first); expert_parallel_degree, a subdivision of data parallel, is not one."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name.endswith("_degree") and f.name != "expert_parallel_degree"}

    @property
    def world_size(self) -> int:
        """Product of all degrees (0 while data_parallel_degree is still unresolved)."""
        size = 1
        for degree in self.degrees().values():
            size *= degree
        return size

    def validate(self, prefix: str = "parallel") -> None:
        """Raises ConfigError naming the field: a degree < 1 (data_parallel_degree may be 0: fill the world), an unknown
        zero_stage, or zero_stage > 0 with fewer than 2 data x context parallel ranks to shard over."""
        for name, degree in self.degrees().items():
            if name == "data_parallel_degree":
                non_negative(f"{prefix}.{name}", degree)  # 0: fill the world (resolved by RecipeConfig)
            else:
                positive(f"{prefix}.{name}", degree)
        positive(f"{prefix}.expert_parallel_degree", self.expert_parallel_degree)
        non_negative(f"{prefix}.expert_capacity_factor", self.expert_capacity_factor)
        one_of(f"{prefix}.sequence_parallel", self.sequence_parallel, (True, False))
        one_of(f"{prefix}.zero_stage", self.zero_stage, ZERO_STAGES)
        replicas = self.data_parallel_degree * self.context_parallel_degree
        if self.zero_stage > 0 and replicas < 2:
            raise ConfigError(f"{prefix}.zero_stage", self.zero_stage,
                              f"shards over the ranks holding identical parameters (data x context parallel), which "
                              f"needs {prefix}.data_parallel_degree * context_parallel_degree >= 2 (it is "
                              f"{replicas}); use zero_stage=0")


def resolve_data_parallel(parallel: ParallelConfig, cluster: ClusterConfig) -> None:
    """data_parallel_degree=0 (the default) becomes the cluster's world size divided by the other degrees, so
    `cluster=cpu_2proc` alone runs 2-way data parallel. ConfigError when the other degrees do not divide it."""
    if parallel.data_parallel_degree != 0:
        return
    others = 1
    for name, degree in parallel.degrees().items():
        if name != "data_parallel_degree":
            others *= int(degree)
    world = int(cluster.world_size)
    if others < 1 or world % others:
        raise ConfigError("parallel.data_parallel_degree", 0,
                          f"fills the world only when the world size cluster.num_nodes*cluster.num_workers_per_node="
                          f"{world} is a multiple of the other degrees' product {others}; set the degrees explicitly")
    parallel.data_parallel_degree = world // others


def check_parallel_model(parallel: ParallelConfig, model, seq_len: int, prefix: str = "parallel") -> None:
    """Divisibility of the model and sequence by the TP/CP degrees; ConfigError naming the field.

    TP splits query heads, KV heads and the FFN hidden size (the vocabulary is padded, so any size works); when
    tp is a multiple of num_kv_heads instead, each KV head is replicated on tp/num_kv_heads consecutive TP ranks
    (Megatron / vLLM convention), so num_kv_heads % tp == 0 or tp % num_kv_heads == 0 is required;
    sequence parallel splits the sequence over TP; CP splits the sequence into 2*cp zigzag chunks.
    """
    tp, cp = int(parallel.tensor_parallel_degree), int(parallel.context_parallel_degree)
    if model.num_heads % tp:
        raise ConfigError(f"{prefix}.tensor_parallel_degree", tp,
                          f"must divide model.num_heads={model.num_heads}")
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        raise ConfigError(f"{prefix}.tensor_parallel_degree", tp,
                          f"must divide model.num_kv_heads={model.num_kv_heads} or be a multiple of it (then each "
                          "KV head is replicated on tensor_parallel_degree/num_kv_heads ranks)")
    if model.ffn_hidden_dim % tp:
        raise ConfigError(f"{prefix}.tensor_parallel_degree", tp,
                          f"must divide model.ffn_hidden_dim={model.ffn_hidden_dim}")
    if parallel.sequence_parallel and tp > 1 and (seq_len // cp) % tp:
        raise ConfigError(f"{prefix}.sequence_parallel", True,
                          f"needs the per-rank sequence length {seq_len // cp} divisible by "
                          f"tensor_parallel_degree={tp}")
    check_expert_parallel(parallel, model, prefix)
    if cp > 1 and seq_len % (2 * cp):
        raise ConfigError("data.seq_len", seq_len,
                          f"must be divisible by 2*parallel.context_parallel_degree={2 * cp} (zigzag chunks)")


def check_expert_parallel(parallel: ParallelConfig, model, prefix: str = "parallel") -> None:
    """ConfigError naming the field: expert_parallel_degree > 1 without experts, not dividing model.num_experts or
    data_parallel_degree, or combined with context parallel (not supported together); a MoE model under tensor
    parallel (its experts are not split by TP). ZeRO composes with it (parallel/zero.py: expert shards over the
    expert-data-parallel group)."""
    ep = int(getattr(parallel, "expert_parallel_degree", 1))
    experts = int(getattr(model, "num_experts", 0))
    if experts and int(parallel.tensor_parallel_degree) > 1:
        raise ConfigError(f"{prefix}.tensor_parallel_degree", parallel.tensor_parallel_degree,
                          "must be 1 for a Mixture-of-Experts model (use expert_parallel_degree)")
    if ep == 1:
        return
    field = f"{prefix}.expert_parallel_degree"
    if not experts:
        raise ConfigError(field, ep, "needs a Mixture-of-Experts model (model.num_experts > 0)")
    if experts % ep:
        raise ConfigError(field, ep, f"must divide model.num_experts={experts}")
    dp = int(parallel.data_parallel_degree)
    if dp and dp % ep:
        raise ConfigError(field, ep, f"must divide {prefix}.data_parallel_degree={dp} (EP groups are made of "
                                     "data-parallel ranks)")
    if int(parallel.context_parallel_degree) > 1:
        raise ConfigError(field, ep, f"is not supported together with {prefix}.context_parallel_degree > 1")


@dataclass
class HcclConfig:
    """HCCL environment exported to every worker (harmless on CPU, where MCCL ignores it)."""

    connect_timeout_s: int = 120  # HCCL_CONNECT_TIMEOUT: link setup (error EI0006); 120..7200
    exec_timeout_s: int = 1836  # HCCL_EXEC_TIMEOUT: peer wait during execution (error EI0002)
    buffsize_mb: int = 200  # HCCL_BUFFSIZE: lower it when many communicators run out of memory
    if_ip: Optional[str] = None  # HCCL_IF_IP: pin the host NIC by address
    socket_ifname: Optional[str] = None  # HCCL_SOCKET_IFNAME: pin the host NIC by name (e.g. eth0)
    deterministic: str = "false"  # HCCL_DETERMINISTIC: false | true | strict

    def env(self) -> dict[str, str]:
        """The HCCL_* environment variables for every worker, values as strings (NIC pins only when set)."""
        out = {"HCCL_CONNECT_TIMEOUT": str(self.connect_timeout_s), "HCCL_EXEC_TIMEOUT": str(self.exec_timeout_s),
               "HCCL_BUFFSIZE": str(self.buffsize_mb), "HCCL_DETERMINISTIC": self.deterministic}
        if self.if_ip:
            out["HCCL_IF_IP"] = self.if_ip
        if self.socket_ifname:
            out["HCCL_SOCKET_IFNAME"] = self.socket_ifname
        return out

    def validate(self, prefix: str = "cluster.hccl") -> None:
        """Raises ConfigError naming the field: connect_timeout_s outside [120, 7200] s, exec_timeout_s < 0,
        buffsize_mb <= 0, an unknown deterministic mode, or if_ip that is not an IPv4 address."""
        in_range(f"{prefix}.connect_timeout_s", self.connect_timeout_s, 120, 7200)
        non_negative(f"{prefix}.exec_timeout_s", self.exec_timeout_s)
        positive(f"{prefix}.buffsize_mb", self.buffsize_mb)
        one_of(f"{prefix}.deterministic", self.deterministic, HCCL_DETERMINISTIC)
        if self.if_ip is not None:
            _check_ipv4(f"{prefix}.if_ip", self.if_ip)


@dataclass
class ClusterConfig:
    """Hardware and launch of a job (recipe group `cluster/`): nodes x workers per node, launcher (msrun or an HCCL
    rank table), rendezvous address, timeouts (seconds), worker environment and the planner's declared hardware."""

    name: str = "cpu_1proc"
    num_nodes: int = 1
    num_workers_per_node: int = 1
    # msrun: dynamic cluster (scheduler + workers). rank_table: one process per device with RANK_TABLE_FILE,
    # RANK_ID and DEVICE_ID and no scheduler (Ascend only).
    launcher: str = "msrun"
    node_rank: int = 0  # this node's index, 0..num_nodes-1 (set per node on multi-node jobs)
    master_addr: str = "127.0.0.1"  # node 0's IP, reachable from every node
    master_port: int = 8118
    # HCCL rank table (JSON); relative paths are looked up from the working directory, then the repository.
    rank_table_file: Optional[str] = None
    visible_devices: Optional[str] = None  # ASCEND_RT_VISIBLE_DEVICES, e.g. "0,1,2,3"
    log_dir: str = "msrun_log"  # scheduler.log and worker_<rank>.log
    cluster_timeout_s: int = 600  # msrun --cluster_time_out (MS_TOPO_TIMEOUT)
    job_timeout_s: Optional[int] = None  # wall-clock limit for the whole job; None: no limit
    failure_grace_s: int = 10  # after a worker fails, how long msrun may take to stop before it is killed
    # Seconds between a worker's heartbeats to the msrun scheduler (MS_RETRY_INTERVAL_LOWER = _UPPER); None keeps
    # MindSpore's random 3-5 s. A worker learns that the cluster is built from a heartbeat reply and its exit waits
    # for the heartbeat thread's sleep, so 1 starts and ends a small local job seconds sooner; large clusters keep
    # the default, which spreads the scheduler's load.
    heartbeat_s: Optional[int] = None
    bind_core: bool = False
    tail_worker_log: str = "all"  # worker logs msrun echoes to the console: all | none | ranks like "0" or "0,1"
    hccl: HcclConfig = field(default_factory=HcclConfig)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every worker
    # Hardware, read by the memory/time planner (`ascend-llm plan`). None: not declared (no memory check).
    device_memory_gib: Optional[float] = None  # memory of one device (910B: 64 GB HBM)
    intra_node_gb_per_s: Optional[float] = None  # declared per-device collective bandwidth inside a node, GB/s
    inter_node_gb_per_s: Optional[float] = None  # declared per-device collective bandwidth across nodes, GB/s

    @property
    def world_size(self) -> int:
        """Number of processes: num_nodes * num_workers_per_node."""
        return self.num_nodes * self.num_workers_per_node

    def validate(self, prefix: str = "cluster") -> None:
        """Raises ConfigError naming the field: counts <= 0, node_rank outside 0..num_nodes-1, master_port outside
        [1024, 65535], an empty master_addr or log_dir, malformed visible_devices, tail_worker_log or env keys,
        timeouts, heartbeat_s or declared hardware figures <= 0 (failure_grace_s < 0), bad HCCL settings, or
        launcher=rank_table without rank_table_file."""
        positive(f"{prefix}.num_nodes", self.num_nodes)
        positive(f"{prefix}.num_workers_per_node", self.num_workers_per_node)
        one_of(f"{prefix}.launcher", self.launcher, LAUNCHERS)
        if not (0 <= self.node_rank < self.num_nodes):
            raise ConfigError(f"{prefix}.node_rank", self.node_rank,
                              f"must be in 0..{self.num_nodes - 1} (cluster.num_nodes={self.num_nodes})")
        in_range(f"{prefix}.master_port", self.master_port, 1024, 65535)
        if not self.master_addr or any(c.isspace() for c in self.master_addr):
            raise ConfigError(f"{prefix}.master_addr", self.master_addr, "must be node 0's IP address or host name")
        positive(f"{prefix}.cluster_timeout_s", self.cluster_timeout_s)
        if self.job_timeout_s is not None:
            positive(f"{prefix}.job_timeout_s", self.job_timeout_s)
        non_negative(f"{prefix}.failure_grace_s", self.failure_grace_s)
        if self.heartbeat_s is not None:
            positive(f"{prefix}.heartbeat_s", self.heartbeat_s)
        if not self.log_dir:
            raise ConfigError(f"{prefix}.log_dir", self.log_dir, "must be a directory path")
        self._validate_tail(prefix)
        if self.visible_devices is not None and not re.fullmatch(r"\d+(,\d+)*", str(self.visible_devices)):
            raise ConfigError(f"{prefix}.visible_devices", self.visible_devices,
                              "must be a comma-separated list of device ids, e.g. 0,1,2,3")
        if self.visible_devices is not None and len(str(self.visible_devices).split(",")) < self.num_workers_per_node:
            raise ConfigError(f"{prefix}.visible_devices", self.visible_devices,
                              f"must list at least cluster.num_workers_per_node={self.num_workers_per_node} devices")
        for key in self.env:
            if not ENV_NAME.fullmatch(str(key)):
                raise ConfigError(f"{prefix}.env", key,
                                  "keys must be environment variable names ([A-Za-z_][A-Za-z0-9_]*)")
        self.hccl.validate(f"{prefix}.hccl")
        for name in ("device_memory_gib", "intra_node_gb_per_s", "inter_node_gb_per_s"):
            if getattr(self, name) is not None:
                positive(f"{prefix}.{name}", getattr(self, name))
        if self.launcher == "rank_table" and not self.rank_table_file:
            raise ConfigError(f"{prefix}.rank_table_file", self.rank_table_file,
                              "required when cluster.launcher=rank_table")

    def _validate_tail(self, prefix: str) -> None:
        value = str(self.tail_worker_log)
        if value in ("all", "none"):
            return
        ranks = value.split(",")
        if not all(r.isdigit() and int(r) < self.world_size for r in ranks):
            raise ConfigError(f"{prefix}.tail_worker_log", self.tail_worker_log,
                              f"allowed: all, none, or ranks in 0..{self.world_size - 1} separated by commas")

def _check_ipv4(field_name: str, value: str) -> None:
    import ipaddress

    try:
        ipaddress.IPv4Address(str(value))
    except ValueError:
        raise ConfigError(field_name, value, "must be an IPv4 address like 192.168.1.10") from None


def check_world_size(parallel: ParallelConfig, cluster: ClusterConfig) -> int:
    """The world size; ConfigError unless the product of the `*_degree` fields equals
    cluster.num_nodes * cluster.num_workers_per_node. A data_parallel_degree of 0 is resolved first."""
    resolve_data_parallel(parallel, cluster)
    size, cluster_size = parallel.world_size, int(cluster.world_size)
    if size != cluster_size:
        named = parallel.degrees()
        first = next(iter(named))
        shown = {n: v for n, v in named.items() if v != 1 or n == first}  # degrees of 1 add nothing
        product = " * ".join(f"{name}={value}" for name, value in shown.items())
        raise ConfigError(f"parallel.{first}", getattr(parallel, first),
                          f"world size {product} = {size} must equal cluster.num_nodes*cluster.num_workers_per_node"
                          f" = {cluster.num_nodes}*{cluster.num_workers_per_node} = {cluster_size} (e.g. "
                          f"parallel.data_parallel_degree={cluster_size} for data parallel only)")
    return size
