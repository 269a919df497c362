"""Build the launch command(s) of a recipe: msrun's dynamic cluster, HCCL rank-table mode, or one process.

`build_launch_plan(recipe, overrides)` returns argv lists and environment additions; nothing goes through a
shell. `describe_plan` renders them as shell-quoted lines for `--dry-run`. `ascend_llm.cluster.supervise`
runs a plan with failure detection and timeouts.

Modes (from `cluster.launcher` and the world size):
- single: world size 1 -> `python -m ascend_llm.cli.main train <overrides>` directly.
- msrun: `msrun --worker_num=W --local_worker_num=L --master_addr=A --master_port=P --node_rank=N
  --log_dir=D --join=True --cluster_time_out=T [--rank_table_file=F] python -m ascend_llm.cli.main train ...`;
  multi-node jobs run the same command on every node with that node's `cluster.node_rank`.
- rank_table: one process per device of `server_list[cluster.node_rank]` with RANK_TABLE_FILE, RANK_ID,
  DEVICE_ID and RANK_SIZE (no scheduler; HCCL on Ascend only).
Every mode exports the HCCL knobs of `cluster.hccl`, `ASCEND_RT_VISIBLE_DEVICES` when set, and `cluster.env`;
with several workers on a node, `OMP_NUM_THREADS` = this node's cores / its workers (at least 1) unless the
environment or `cluster.env` sets it: the CPU kernel threads of each worker (`runtime.num_threads=0`, see
train/runtime.py), so workers sharing the cores do not oversubscribe them (torchrun sets 1 per worker).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ascend_llm.config.threads import THREADS_ENV, available_cpus, env_threads, parse_threads
from ascend_llm.errors import LaunchError

TRAIN_MODULE = ("-m", "ascend_llm.cli.main", "train")


@dataclass
class ProcessSpec:
    """One process this launcher starts: argv, environment additions, and where its output goes."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    rank: Optional[int] = None  # known in rank-table mode; msrun assigns ranks itself
    log_path: Optional[Path] = None  # None: output goes to the console (single, msrun)


@dataclass
class LaunchPlan:
    mode: str  # single | msrun | rank_table
    processes: list[ProcessSpec]
    log_dir: Path
    world_size: int
    num_local_workers: int
    cluster_timeout_s: int
    job_timeout_s: Optional[int] = None
    failure_grace_s: int = 10
    master: Optional[tuple[str, int]] = None  # (addr, port) this node serves as msrun scheduler, if any
    path_prefix: Optional[str] = None  # prepended to PATH so msrun's `python` is this interpreter


def msrun_executable() -> str:
    """The msrun beside this interpreter (a venv's bin), else the one on PATH, else plain `msrun`."""
    beside = Path(sys.executable).with_name("msrun")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("msrun") or "msrun"


# ascend_llm's log level -> MindSpore's GLOG_v (0 debug, 1 info, 2 warning, 3 error). MindSpore's own INFO is
# its cluster layer's chatter (one line per RPC event), so our INFO maps to its WARNING.
GLOG_LEVELS = {"DEBUG": "1", "INFO": "2", "WARNING": "2", "ERROR": "3", "CRITICAL": "3"}


def mindspore_log_env() -> dict[str, str]:
    """GLOG_v for the workers from $ASCEND_LLM_LOG_LEVEL (default INFO -> 2), unless GLOG_v is already set."""
    if "GLOG_v" in os.environ:
        return {}
    level = os.environ.get("ASCEND_LLM_LOG_LEVEL", "INFO").upper()
    return {"GLOG_v": GLOG_LEVELS.get(level, "2")}


def worker_threads_env(num_local_workers: int) -> dict[str, str]:
    """{OMP_NUM_THREADS: cores // workers (at least 1)} for `num_local_workers` > 1 workers sharing this node's
    cores; {} for one worker or when the launcher's own environment sets a value."""
    if num_local_workers <= 1 or env_threads() is not None:
        return {}
    return {THREADS_ENV: str(max(1, available_cpus() // num_local_workers))}


def heartbeat_env(seconds: Optional[int]) -> dict[str, str]:
    """{MS_RETRY_INTERVAL_LOWER, MS_RETRY_INTERVAL_UPPER: seconds} (MindSpore draws each heartbeat interval between
    the two; documented in MindSpore's environment-variable list), {} for None (MindSpore's 3 and 5)."""
    if seconds is None:
        return {}
    return {"MS_RETRY_INTERVAL_LOWER": str(int(seconds)), "MS_RETRY_INTERVAL_UPPER": str(int(seconds))}


def base_env(cluster: Any, num_local_workers: int = 1) -> dict[str, str]:
    """Environment additions for every worker: HCCL knobs, visible devices, the log level, the kernel threads of
    `num_local_workers` workers sharing this node (worker_threads_env), the heartbeat interval (heartbeat_env),
    cluster.env (last, so the user's values win)."""
    env = dict(cluster.hccl.env())
    env.update(mindspore_log_env())
    env.update(worker_threads_env(num_local_workers))
    env.update(heartbeat_env(cluster.heartbeat_s))
    if cluster.visible_devices is not None:
        env["ASCEND_RT_VISIBLE_DEVICES"] = str(cluster.visible_devices)
    env.update({str(k): str(v) for k, v in dict(cluster.env).items()})
    if THREADS_ENV in dict(cluster.env):
        parse_threads(f"cluster.env.{THREADS_ENV}", env[THREADS_ENV])
    return env


def is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _worker_task(overrides: Sequence[str], script: Optional[str], script_args: Sequence[str]) -> list[str]:
    """What each worker runs, after the interpreter: the trainer module, or a user script."""
    if script is None:
        return [*TRAIN_MODULE, *overrides]
    path = Path(script).expanduser()
    if not path.is_file():
        raise LaunchError("--script", script, "file not found")
    return [str(path.resolve()), *overrides, *script_args]


def _tail_arg(cluster: Any, world: int) -> Optional[str]:
    value = str(cluster.tail_worker_log)
    if value == "all":
        return None
    return str(world) if value == "none" else value  # msrun compares global ranks; `world` matches none


def build_launch_plan(recipe: Any, overrides: Sequence[str] = (), script: Optional[str] = None,
                      script_args: Sequence[str] = ()) -> LaunchPlan:
    """The commands that launch `recipe` on this node. `overrides` are passed on to every worker."""
    from ascend_llm.config.parallel import check_world_size

    cluster, world = recipe.cluster, check_world_size(recipe.parallel, recipe.cluster)
    env_threads()  # a bad OMP_NUM_THREADS fails here, not in every worker after msrun started (cli/main checks too)
    task = _worker_task(overrides, script, script_args)
    log_dir = Path(cluster.log_dir).expanduser().absolute()
    env = base_env(cluster, 1 if world == 1 else int(cluster.num_workers_per_node))
    common = dict(log_dir=log_dir, world_size=world, cluster_timeout_s=int(cluster.cluster_timeout_s),
                  job_timeout_s=cluster.job_timeout_s, failure_grace_s=int(cluster.failure_grace_s))
    if world == 1:
        return LaunchPlan("single", [ProcessSpec([sys.executable, *task], env)], num_local_workers=1, **common)
    if cluster.launcher == "rank_table":
        return _rank_table_plan(cluster, task, env, common)
    return _msrun_plan(cluster, task, env, common)


def _msrun_plan(cluster: Any, task: list[str], env: dict[str, str], common: dict) -> LaunchPlan:
    if cluster.num_nodes > 1 and is_loopback(cluster.master_addr):
        raise LaunchError("cluster.master_addr", cluster.master_addr,
                          f"a {cluster.num_nodes}-node job needs node 0's IP address, reachable from every node "
                          "(e.g. cluster.master_addr=10.0.0.1)")
    argv = [msrun_executable(), f"--worker_num={common['world_size']}",
            f"--local_worker_num={cluster.num_workers_per_node}", f"--master_addr={cluster.master_addr}",
            f"--master_port={cluster.master_port}", f"--node_rank={cluster.node_rank}",
            f"--log_dir={common['log_dir']}", "--join=True", f"--cluster_time_out={cluster.cluster_timeout_s}"]
    if cluster.bind_core:
        argv.append("--bind_core=True")
    if cluster.rank_table_file:
        from ascend_llm.cluster.rank_table import resolve_rank_table_path

        argv.append(f"--rank_table_file={resolve_rank_table_path(cluster.rank_table_file, 'cluster.rank_table_file')}")
    tail = _tail_arg(cluster, common["world_size"])
    if tail is not None:
        argv.append(f"--tail_worker_log={tail}")
    # msrun runs `python <script> ...` for a script path; `python -m ...` must name the interpreter itself.
    argv += ["python", *task] if task[0] == "-m" else task
    master = (cluster.master_addr, int(cluster.master_port)) if cluster.node_rank == 0 else None
    return LaunchPlan("msrun", [ProcessSpec(argv, env)], num_local_workers=cluster.num_workers_per_node,
                      master=master, path_prefix=str(Path(sys.executable).parent), **common)


def _rank_table_plan(cluster: Any, task: list[str], env: dict[str, str], common: dict) -> LaunchPlan:
    from ascend_llm.cluster.rank_table import load_rank_table, resolve_rank_table_path

    if not cluster.rank_table_file:
        raise LaunchError("cluster.rank_table_file", None, "required when cluster.launcher=rank_table")
    path = resolve_rank_table_path(cluster.rank_table_file, "cluster.rank_table_file")
    table = load_rank_table(path)
    if table.world_size != common["world_size"]:
        raise LaunchError("cluster.rank_table_file", str(path),
                          f"lists {table.world_size} ranks; the recipe's world size is {common['world_size']}")
    server = table.servers[cluster.node_rank]
    processes = []
    for device in sorted(server.devices, key=lambda d: d.rank_id):
        proc_env = dict(env, RANK_TABLE_FILE=str(path), RANK_ID=str(device.rank_id),
                        DEVICE_ID=str(device.device_id), RANK_SIZE=str(common["world_size"]))
        processes.append(ProcessSpec([sys.executable, *task], proc_env, rank=device.rank_id,
                                     log_path=common["log_dir"] / f"worker_{device.rank_id}.log"))
    return LaunchPlan("rank_table", processes, num_local_workers=len(processes), **common)


def describe_plan(plan: LaunchPlan) -> str:
    """Shell-quoted command lines (environment additions first) for `--dry-run` and the launch log."""
    lines = [f"# mode={plan.mode} world_size={plan.world_size} local_workers={plan.num_local_workers} "
             f"log_dir={plan.log_dir}"]
    if plan.path_prefix:
        lines.append(f"# msrun starts `python` from PATH; this launcher puts {plan.path_prefix} first")
    for spec in plan.processes:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in spec.env.items())
        line = (env + " " if env else "") + shlex.join(spec.argv)
        if spec.log_path is not None:
            line += f" > {shlex.quote(str(spec.log_path))} 2>&1"
        lines.append(line)
    return "\n".join(lines)


def find_free_port(low: int = 20000, high: int = 30000) -> int:
    """A port nobody listens on, below Linux's ephemeral range (32768+) so that outgoing connections of the
    job itself cannot take it between this check and the scheduler's bind."""
    import random

    candidates = list(range(low, high))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LaunchError("cluster.master_port", f"{low}..{high}", "no free port found in this range")


def check_port_free(addr: str, port: int) -> None:
    """Refuse to start when something already listens on the scheduler port (another job)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host = "" if is_loopback(addr) or addr in ("0.0.0.0",) else addr
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError("cluster.master_port", port,
                              f"cannot use it on {addr or 'this host'} ({exc.strerror or exc}); another job may "
                              "be running: pick a free port, e.g. cluster.master_port=18118") from None
