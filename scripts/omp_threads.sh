# Sourced by msrun_launch.sh and rank_table_launch.sh (which define `die` and the `envs` array of --env KEY=VALUE).
# OMP_NUM_THREADS, the CPU kernel threads of each process, as the toolkit reads it (ascend_llm/config/threads.py):
# empty counts as unset; else a positive integer or OpenMP's list form like 4,2 (its first entry counts).

check_threads() {  # check_threads WHERE VALUE
    local first="${2%%,*}"
    first="${first//[[:space:]]/}"
    [[ -z "${2//[[:space:]]/}" ]] && return 0
    [[ "$first" =~ ^[0-9]+$ ]] && (( 10#$first >= 1 )) \
        || die "$1='$2': must be a positive integer, or OpenMP's list form like 4,2 (its first entry counts)"
}

# default_omp_threads PROCESSES: processes sharing this node share its cores, as `ascend-llm launch` does:
# appends OMP_NUM_THREADS=cores/PROCESSES (at least 1) to envs unless the environment or --env sets a value;
# checks both.
default_omp_threads() {
    local processes="$1" omp_env="${OMP_NUM_THREADS:-}" omp_given=0 kv threads
    check_threads OMP_NUM_THREADS "$omp_env"
    for kv in ${envs[@]+"${envs[@]}"}; do
        if [[ "$kv" == OMP_NUM_THREADS=* ]]; then
            check_threads "--env OMP_NUM_THREADS" "${kv#OMP_NUM_THREADS=}"
            [[ -n "${kv#OMP_NUM_THREADS=}" ]] && omp_given=1
        fi
    done
    if (( processes > 1 && ! omp_given )) && [[ -z "${omp_env//[[:space:]]/}" ]]; then
        threads=$(( $(nproc) / processes )); (( threads >= 1 )) || threads=1
        envs+=("OMP_NUM_THREADS=$threads")
    fi
}
