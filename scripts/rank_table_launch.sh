#!/usr/bin/env bash
# Rank-table launch (no msrun): one process per device of this node's server in an HCCL rank table.
# The recipe-driven way is `ascend-llm launch cluster=910b_1x8_rank_table cluster.launcher=rank_table`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/rank_table_launch.sh --rank-table FILE [options] -- COMMAND [ARGS...]

Validates FILE, then starts COMMAND once per device of server_list[NODE_RANK] with
RANK_TABLE_FILE, RANK_ID, DEVICE_ID and RANK_SIZE exported, each writing LOG_DIR/worker_<rank>.log.
If one process fails, the others are stopped, its rank and the tail of its log are printed, and the
exit status is non-zero.

Options:
  --rank-table FILE   HCCL rank table (required); check it with `ascend-llm rank-table validate FILE`
  --node-rank R       which server of the table this node is (server_list[R]), default 0
  --log-dir DIR       default rank_table_log
  --timeout S         stop everything after S seconds (0 = no limit), default 0
  --env KEY=VALUE     export a variable to every process (repeatable), e.g. --env HCCL_CONNECT_TIMEOUT=600;
                      OMP_NUM_THREADS (CPU kernel threads per process) defaults to cores / processes when unset
  --dry-run           print the commands instead of running them
  -h, --help          show this help

Environment: PYTHON (default python3) reads the table.

Example:
  scripts/rank_table_launch.sh --rank-table hccl_configs/hccl_910b_1x8.json -- \
      python -m ascend_llm.cli.main train cluster=910b_1x8_rank_table parallel=dp8 cluster.launcher=rank_table
EOF
}

die() { echo "rank_table_launch.sh: $*" >&2; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/omp_threads.sh"

rank_table="" node_rank=0 log_dir=rank_table_log timeout=0 dry_run=0
envs=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --rank-table) [[ $# -ge 2 ]] || die "--rank-table needs a value"; rank_table="$2"; shift 2 ;;
        --node-rank) [[ $# -ge 2 ]] || die "--node-rank needs a value"; node_rank="$2"; shift 2 ;;
        --log-dir) [[ $# -ge 2 ]] || die "--log-dir needs a value"; log_dir="$2"; shift 2 ;;
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; timeout="$2"; shift 2 ;;
        --env) [[ $# -ge 2 ]] || die "--env needs KEY=VALUE"; envs+=("$2"); shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) break ;;
    esac
done
[[ -n "$rank_table" ]] || die "--rank-table is required (see --help)"
[[ -f "$rank_table" ]] || die "--rank-table='$rank_table': file not found"
[[ "$node_rank" =~ ^[0-9]+$ ]] || die "--node-rank='$node_rank': must be a non-negative integer"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout='$timeout': must be a non-negative integer"
[[ $# -gt 0 ]] || die "no COMMAND given (see --help)"
for kv in ${envs[@]+"${envs[@]}"}; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv': must look like KEY=VALUE"
done
table="$(cd "$(dirname "$rank_table")" && pwd)/$(basename "$rank_table")"

# "world_size" then one "rank_id device_id" line per device of server_list[node_rank]; the table is
# validated by the toolkit when it is installed, else only parsed.
devices="$("${PYTHON:-python3}" - "$table" "$node_rank" <<'PY'
import json, sys
path, node = sys.argv[1], int(sys.argv[2])
try:
    from ascend_llm.cluster.rank_table import load_rank_table
except ImportError:
    load_rank_table = None
if load_rank_table is not None:
    from ascend_llm.errors import RankTableError
    try:
        load_rank_table(path)
    except RankTableError as exc:
        sys.exit(exc.one_line())
table = json.load(open(path))
servers = table["server_list"]
if node >= len(servers):
    sys.exit(f"--node-rank={node}: the table has {len(servers)} server(s) (0..{len(servers) - 1})")
print(sum(len(s["device"]) for s in servers))
for d in sorted(servers[node]["device"], key=lambda d: int(d["rank_id"])):
    print(d["rank_id"], d["device_id"])
PY
)" || die "cannot use $rank_table"
world_size="$(head -n1 <<<"$devices")"
mapfile -t local_devices < <(tail -n +2 <<<"$devices")
# processes sharing this node share its cores (OMP_NUM_THREADS = cores / processes unless set)
default_omp_threads "${#local_devices[@]}"

if (( dry_run )); then
    for line in "${local_devices[@]}"; do
        read -r rank device <<<"$line"
        for kv in ${envs[@]+"${envs[@]}"}; do printf '%q ' "$kv"; done
        printf 'RANK_TABLE_FILE=%q RANK_ID=%q DEVICE_ID=%q RANK_SIZE=%q ' "$table" "$rank" "$device" "$world_size"
        printf '%q ' "$@"; printf '> %q 2>&1\n' "$log_dir/worker_$rank.log"
    done
    exit 0
fi

mkdir -p "$log_dir"
for kv in ${envs[@]+"${envs[@]}"}; do export "${kv?}"; done
pids=() ranks=()
# Each process leads its own process group (setsid), so stopping it also stops its children.
stop_all() {
    for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true; done
    sleep 2
    for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
for line in "${local_devices[@]}"; do
    read -r rank device <<<"$line"
    RANK_TABLE_FILE="$table" RANK_ID="$rank" DEVICE_ID="$device" RANK_SIZE="$world_size" \
        setsid "$@" >"$log_dir/worker_$rank.log" 2>&1 &
    pids+=("$!"); ranks+=("$rank")
    echo "started rank $rank (device $device, pid $!), log $log_dir/worker_$rank.log"
done

start=$SECONDS
remaining=${#pids[@]}
declare -A done_pid=()
while (( remaining > 0 )); do
    for i in "${!pids[@]}"; do
        pid="${pids[$i]}"
        [[ -z "${done_pid[$pid]:-}" ]] || continue
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0; wait "$pid" || status=$?
            done_pid[$pid]=1; remaining=$((remaining - 1))
            if (( status != 0 )); then
                stop_all
                echo "rank_table_launch.sh: rank ${ranks[$i]} exited with status $status; stopped the others" >&2
                echo "--- last 30 lines of $log_dir/worker_${ranks[$i]}.log ---" >&2
                tail -n 30 "$log_dir/worker_${ranks[$i]}.log" >&2 || true
                exit "$status"
            fi
        fi
    done
    if (( timeout > 0 && SECONDS - start > timeout )); then
        stop_all
        echo "rank_table_launch.sh: timed out after $timeout s; stopped all processes" >&2
        exit 124
    fi
    sleep 1
done
echo "all ${#pids[@]} processes finished"
