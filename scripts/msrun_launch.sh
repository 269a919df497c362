#!/usr/bin/env bash
# msrun launch for people who prefer shell. The recipe-driven way is `ascend-llm launch` (same msrun argv).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/msrun_launch.sh [options] -- COMMAND [ARGS...]

Starts COMMAND on every worker of this node with msrun's dynamic cluster (scheduler + workers).
COMMAND is a Python script (`train.py ...`, run as `python train.py ...`) or `python -m module ...`.

Options:
  --workers N         workers on this node (msrun --local_worker_num), default 8
  --nodes N           number of nodes; world size = nodes * workers, default 1
  --node-rank R       this node's index 0..nodes-1, default 0
  --master-addr ADDR  node 0's IP address (required when --nodes > 1), default 127.0.0.1
  --master-port PORT  scheduler port 1024..65535, default 8118
  --log-dir DIR       scheduler.log and worker_<rank>.log go here, default msrun_log
  --timeout S         msrun --cluster_time_out in seconds, default 600
  --rank-table FILE   also pass an HCCL rank table (msrun --rank_table_file)
  --bind-core         bind CPU cores per worker (msrun --bind_core=True)
  --env KEY=VALUE     export a variable to every worker (repeatable), e.g. --env HCCL_CONNECT_TIMEOUT=600;
                      OMP_NUM_THREADS (CPU kernel threads per worker) defaults to cores / workers when unset
  --dry-run           print the command instead of running it
  -h, --help          show this help

Environment: MSRUN (default: msrun on PATH).

Examples:
  # one node, 8 NPUs
  scripts/msrun_launch.sh --workers 8 -- python -m ascend_llm.cli.main train cluster=910b_1x8 parallel=dp8
  # two nodes: run on each node with its rank
  scripts/msrun_launch.sh --nodes 2 --workers 8 --node-rank 1 --master-addr 10.0.0.1 -- train.py --lr 1e-4
  # two CPU workers on this machine
  scripts/msrun_launch.sh --workers 2 -- python -m ascend_llm.cli.main train cluster=cpu_2proc parallel=dp2
EOF
}

die() { echo "msrun_launch.sh: $*" >&2; exit 2; }
need_int() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1='$2': must be a non-negative integer"; }

workers=8 nodes=1 node_rank=0 master_addr=127.0.0.1 master_port=8118 log_dir=msrun_log timeout=600
rank_table="" bind_core=0 dry_run=0
envs=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --workers) [[ $# -ge 2 ]] || die "--workers needs a value"; workers="$2"; shift 2 ;;
        --nodes) [[ $# -ge 2 ]] || die "--nodes needs a value"; nodes="$2"; shift 2 ;;
        --node-rank) [[ $# -ge 2 ]] || die "--node-rank needs a value"; node_rank="$2"; shift 2 ;;
        --master-addr) [[ $# -ge 2 ]] || die "--master-addr needs a value"; master_addr="$2"; shift 2 ;;
        --master-port) [[ $# -ge 2 ]] || die "--master-port needs a value"; master_port="$2"; shift 2 ;;
        --log-dir) [[ $# -ge 2 ]] || die "--log-dir needs a value"; log_dir="$2"; shift 2 ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; timeout="$2"; shift 2 ;;
        --rank-table) [[ $# -ge 2 ]] || die "--rank-table needs a value"; rank_table="$2"; shift 2 ;;
        --env) [[ $# -ge 2 ]] || die "--env needs KEY=VALUE"; envs+=("$2"); shift 2 ;;
        --bind-core) bind_core=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || die "no COMMAND given (see --help)"

need_int --workers "$workers"; need_int --nodes "$nodes"; need_int --node-rank "$node_rank"
need_int --master-port "$master_port"; need_int --timeout "$timeout"
(( workers >= 1 )) || die "--workers='$workers': must be >= 1"
(( nodes >= 1 )) || die "--nodes='$nodes': must be >= 1"
(( node_rank < nodes )) || die "--node-rank='$node_rank': must be in 0..$((nodes - 1))"
(( master_port >= 1024 && master_port <= 65535 )) || die "--master-port='$master_port': must be in 1024..65535"
if (( nodes > 1 )) && [[ "$master_addr" == 127.* || "$master_addr" == localhost ]]; then
    die "--master-addr='$master_addr': a multi-node job needs node 0's IP address, reachable from every node"
fi
if [[ -n "$rank_table" && ! -f "$rank_table" ]]; then die "--rank-table='$rank_table': file not found"; fi
for kv in ${envs[@]+"${envs[@]}"}; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv': must look like KEY=VALUE"
done
# workers sharing this node share its cores (OMP_NUM_THREADS = cores / workers unless set)
source "$(dirname "${BASH_SOURCE[0]}")/omp_threads.sh"
default_omp_threads "$workers"

cmd=("${MSRUN:-msrun}" "--worker_num=$((nodes * workers))" "--local_worker_num=$workers"
     "--master_addr=$master_addr" "--master_port=$master_port" "--node_rank=$node_rank"
     "--log_dir=$log_dir" "--join=True" "--cluster_time_out=$timeout")
if (( bind_core )); then cmd+=("--bind_core=True"); fi
if [[ -n "$rank_table" ]]; then cmd+=("--rank_table_file=$(cd "$(dirname "$rank_table")" && pwd)/$(basename "$rank_table")"); fi
cmd+=("$@")

if (( dry_run )); then
    for kv in ${envs[@]+"${envs[@]}"}; do printf '%q ' "$kv"; done
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
for kv in ${envs[@]+"${envs[@]}"}; do export "${kv?}"; done
exec "${cmd[@]}"
