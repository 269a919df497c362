"""Launch plans (exact msrun argv for single-node, multi-node and rank-table recipes), cluster config errors,
and the supervisor's failure detection and timeouts with fast fake workers (no MindSpore)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ascend_llm.cli.main import main as cli
from ascend_llm.cluster.launch import LaunchPlan, ProcessSpec, build_launch_plan, check_port_free, describe_plan
from ascend_llm.cluster.preflight import preflight
from ascend_llm.cluster.supervise import TIMEOUT_EXIT, run_plan
from ascend_llm.compose import compose_recipe
from ascend_llm.errors import ConfigError, LaunchError

# the supervisor tests mostly wait for fake workers (sleeps, timeouts): one pytest-xdist worker runs them all while
# the other keeps both cores busy (spread over both workers they left both cores idle at once, ~20 CPU-s)
pytestmark = pytest.mark.xdist_group("launch_supervisor")
REPO = Path(__file__).resolve().parents[2]
TRAIN = ["python", "-m", "ascend_llm.cli.main", "train"]


def plan_for(overrides: list[str], **kwargs) -> LaunchPlan:
    return build_launch_plan(compose_recipe(overrides), overrides, **kwargs)


def test_single_node_msrun_argv(tmp_path):
    overrides = ["cluster=cpu_2proc", "parallel=dp2", f"train.output_dir={tmp_path}", "cluster.master_port=8200"]
    plan = plan_for(overrides)
    assert plan.mode == "msrun" and len(plan.processes) == 1
    argv = plan.processes[0].argv
    assert Path(argv[0]).name == "msrun"
    assert argv[1:] == ["--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1", "--master_port=8200",
                        "--node_rank=0", f"--log_dir={tmp_path}/msrun_log", "--join=True",
                        "--cluster_time_out=120", *TRAIN, *overrides]
    assert plan.processes[0].env["HCCL_CONNECT_TIMEOUT"] == "120"
    assert plan.master == ("127.0.0.1", 8200)


def test_multi_node_msrun_argv_on_node_1():
    overrides = ["cluster=910b_2x8", "parallel=dp16", "train.global_batch_size=16", "cluster.master_addr=10.0.0.1",
                 "cluster.node_rank=1", "cluster.log_dir=/logs", "cluster.hccl.if_ip=10.0.0.2"]
    plan = plan_for(overrides)
    argv = plan.processes[0].argv
    assert argv[1:10] == ["--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=8118",
                          "--node_rank=1", "--log_dir=/logs", "--join=True", "--cluster_time_out=900", *TRAIN[:1]]
    assert argv[10:] == [*TRAIN[1:], *overrides]
    assert plan.master is None  # only node 0 serves the scheduler
    env = plan.processes[0].env
    assert env["HCCL_CONNECT_TIMEOUT"] == "1200" and env["HCCL_IF_IP"] == "10.0.0.2"


def test_multi_node_needs_a_real_master_address():
    with pytest.raises(LaunchError, match="node 0's IP") as info:
        plan_for(["cluster=910b_2x8", "parallel=dp16", "train.global_batch_size=16"])
    assert info.value.field == "cluster.master_addr"


def test_rank_table_recipe_passes_the_table_to_msrun():
    plan = plan_for(["cluster=910b_1x8_rank_table", "parallel=dp8"])
    argv = plan.processes[0].argv
    table = REPO / "hccl_configs" / "hccl_910b_1x8.json"
    assert f"--rank_table_file={table}" in argv
    assert argv.index(f"--rank_table_file={table}") < argv.index("python")


def test_rank_table_mode_starts_one_process_per_device_of_this_node(tmp_path):
    overrides = ["cluster=910b_2x8_rank_table", "parallel=dp16", "train.global_batch_size=16",
                 "cluster.launcher=rank_table", "cluster.node_rank=1", f"cluster.log_dir={tmp_path}",
                 "cluster.visible_devices='0,1,2,3,4,5,6,7'", "+cluster.env.GLOG_v=3"]
    plan = plan_for(overrides)
    assert plan.mode == "rank_table" and len(plan.processes) == 8
    table = str(REPO / "hccl_configs" / "hccl_910b_2x8.json")
    for device, spec in enumerate(plan.processes):
        assert spec.argv == [sys.executable, *TRAIN[1:], *overrides]
        assert {k: spec.env[k] for k in ("RANK_TABLE_FILE", "RANK_ID", "DEVICE_ID", "RANK_SIZE")} == {
            "RANK_TABLE_FILE": table, "RANK_ID": str(8 + device), "DEVICE_ID": str(device), "RANK_SIZE": "16"}
        assert spec.env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and spec.env["GLOG_v"] == "3"
        assert spec.log_path == tmp_path / f"worker_{8 + device}.log"
    text = describe_plan(plan)
    assert "RANK_ID=15 DEVICE_ID=7 RANK_SIZE=16" in text and f"> {tmp_path}/worker_15.log 2>&1" in text


def test_world_size_one_runs_the_trainer_directly():
    plan = plan_for(["train.num_steps=3"])
    assert plan.mode == "single" and plan.processes[0].argv == [sys.executable, *TRAIN[1:], "train.num_steps=3"]


def test_dry_run_cli_prints_the_command_and_quotes_it(capsys, tmp_path):
    overrides = ["cluster=cpu_2proc", "parallel=dp2", "train.sample_prompt='a b;c'", f"train.output_dir={tmp_path}"]
    assert cli(["launch", *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--worker_num=2 --local_worker_num=2" in out
    assert "'train.sample_prompt='\"'\"'a b;c'\"'\"''" in out  # shlex quoting, ready to paste
    assert not (tmp_path / "msrun_log").exists()


@pytest.mark.parametrize("overrides,field", [
    (["cluster=cpu_1proc", "parallel=dp2"], "parallel.data_parallel_degree"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.node_rank=1"], "cluster.node_rank"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.launcher=mpirun"], "cluster.launcher"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.launcher=rank_table"], "cluster.rank_table_file"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.master_port=80"], "cluster.master_port"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.hccl.connect_timeout_s=60"], "cluster.hccl.connect_timeout_s"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.hccl.deterministic=maybe"], "cluster.hccl.deterministic"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.tail_worker_log=5"], "cluster.tail_worker_log"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.heartbeat_s=0"], "cluster.heartbeat_s"),
    (["cluster=910b_1x8_rank_table", "parallel.data_parallel_degree=4", "cluster.num_workers_per_node=4"],
     "cluster.num_workers_per_node"),
    (["cluster=910b_1x8_rank_table", "parallel=dp16", "cluster.num_nodes=2", "train.global_batch_size=16"],
     "cluster.num_nodes"),
    (["cluster=cpu_2proc", "parallel=dp2", "cluster.rank_table_file=missing.json"], "cluster.rank_table_file"),
])
def test_cluster_mistakes_are_config_errors(overrides, field):
    with pytest.raises(ConfigError) as info:
        preflight(compose_recipe(overrides))
    assert getattr(info.value, "field", None) == field, str(info.value)


CLUSTER_OPTIONS = sorted(p.stem for p in (REPO / "recipes" / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("option", CLUSTER_OPTIONS)
def test_every_cluster_option_composes_with_matching_degrees_and_plans(option):
    from omegaconf import OmegaConf

    raw = OmegaConf.load(REPO / "recipes" / "cluster" / f"{option}.yaml")
    base = OmegaConf.load(REPO / "recipes" / "cluster" / f"{raw.defaults[0]}.yaml") if "defaults" in raw else raw
    world = base.num_nodes * base.num_workers_per_node
    overrides = [f"cluster={option}", f"parallel.data_parallel_degree={world}", f"train.global_batch_size={world}"]
    if base.num_nodes > 1:
        overrides.append("cluster.master_addr=10.0.0.1")
    recipe = compose_recipe(overrides)
    assert recipe.cluster.world_size == world and recipe.cluster.name == option
    plan = build_launch_plan(recipe, overrides)
    assert plan.mode == ("single" if world == 1 else "msrun") and plan.world_size == world


def test_dims_world_size_and_coordinates():
    from ascend_llm.config.parallel import ClusterConfig, ParallelConfig
    from ascend_llm.parallel.dims import check_world_size, rank_coordinates

    parallel = ParallelConfig(data_parallel_degree=4)
    assert check_world_size(parallel, ClusterConfig(num_nodes=2, num_workers_per_node=2)) == 4
    assert [rank_coordinates(r, parallel)["data_parallel_degree"] for r in (0, 3)] == [0, 3]
    with pytest.raises(ConfigError, match="data_parallel_degree=4 = 4 must equal") as info:
        check_world_size(parallel, ClusterConfig(num_nodes=1, num_workers_per_node=2))
    assert info.value.field == "parallel.data_parallel_degree"


def test_dp_contract_without_a_launcher(monkeypatch):
    from ascend_llm.config.parallel import ClusterConfig, ParallelConfig
    from ascend_llm.parallel import dp

    for name in ("MS_ROLE", "MS_WORKER_NUM", "RANK_TABLE_FILE", "RANK_ID", "RANK_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert dp.init_distributed(ParallelConfig(), ClusterConfig()) == (0, 1)
    grads = (1, 2)
    assert dp.build_grad_reducer(None, 1)(grads) is grads
    assert dp.is_main_rank()
    two = (ParallelConfig(data_parallel_degree=2), ClusterConfig(num_workers_per_node=2))
    with pytest.raises(LaunchError, match="ascend-llm launch"):
        dp.init_distributed(*two)
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "4")
    with pytest.raises(LaunchError, match="msrun started 4 workers") as info:
        dp.init_distributed(*two)
    assert info.value.field == "MS_WORKER_NUM"
    with pytest.raises(ConfigError):
        dp.init_distributed(two[0], ClusterConfig())


def test_launch_cli_bad_recipe_is_one_line_exit_2(capsys):
    assert cli(["launch", "cluster=cpu_1proc", "parallel=dp2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parallel.data_parallel_degree=2" in err


def test_launch_into_a_used_output_folder_is_refused_like_train_before_msrun_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000003").mkdir(parents=True)
    job = ["launch", "cluster=cpu_2proc", "parallel=dp2", f"train.output_dir={run_dir}"]
    assert cli([*job, "--dry-run"]) == 2  # refused even before the plan is printed
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"config error: train.output_dir={str(run_dir)!r}: holds another run (newest: checkpoint "
                          "step_00000003); continue it with train.resume=auto"), err
    assert not (run_dir / "msrun_log").exists()
    for allowed in ("train.resume=auto", "train.overwrite=true"):  # as train allows them; nothing removed here
        assert cli([*job, allowed, "--dry-run"]) == 0
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()


def test_find_free_port_is_below_the_ephemeral_range():
    from ascend_llm.cluster.launch import find_free_port

    port = find_free_port()
    assert 20000 <= port < 30000
    check_port_free("127.0.0.1", port)


def test_port_in_use_is_refused():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match="another job") as info:
            check_port_free("127.0.0.1", port)
    assert info.value.field == "cluster.master_port"


# ---- supervisor, with fake workers -----------------------------------------------------------------------------

def direct_plan(tmp_path: Path, codes: list[str], job_timeout_s=None) -> LaunchPlan:
    specs = [ProcessSpec([sys.executable, "-c", code], {"RANK_ID": str(r)}, rank=r,
                         log_path=tmp_path / f"worker_{r}.log") for r, code in enumerate(codes)]
    return LaunchPlan("rank_table", specs, tmp_path, len(specs), len(specs), 60, job_timeout_s, 1)


def test_direct_mode_names_the_failed_rank_and_stops_the_rest(tmp_path, capsys):
    fail = "import sys, time; time.sleep(0.5); print('rank 1 says boom', flush=True); sys.exit(3)"
    start = time.monotonic()
    result = run_plan(direct_plan(tmp_path, ["import time; time.sleep(60)", fail]), poll_s=0.1)
    assert time.monotonic() - start < 20
    assert (result.returncode, result.failed_rank) == (3, 1)
    assert "rank 1 says boom" in result.log_tail
    report = result.report()
    assert "rank 1: worker exited with code 3" in report and "worker_1.log" in report


def test_direct_mode_job_timeout(tmp_path):
    start = time.monotonic()
    result = run_plan(direct_plan(tmp_path, ["import time; time.sleep(60)"] * 2, job_timeout_s=1), poll_s=0.1)
    assert time.monotonic() - start < 15
    assert result.returncode == TIMEOUT_EXIT and "timed out" in result.reason


def test_direct_mode_success(tmp_path):
    assert run_plan(direct_plan(tmp_path, ["print('ok')"] * 2), poll_s=0.1).returncode == 0


FAKE_MSRUN = """#!{python}
# Behaves like msrun after a worker failed: reports it, then waits for a scheduler that never ends.
import os, subprocess, sys, time
log_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--log_dir=")][0]
env = dict(os.environ, MS_ROLE="MS_WORKER", RANK_ID="1")
with open(os.path.join(log_dir, "worker_1.log"), "w") as fh:
    worker = subprocess.Popen([sys.executable, "-c", "import sys; print('Traceback (most recent call last):');"
                               "print('RuntimeError: injected'); sys.exit(1)"], env=env, stdout=fh, stderr=fh)
print(f"Start worker process with rank id:1, log file:{{log_dir}}/worker_1.log. Environment variable", flush=True)
worker.wait()
print(f"[ERROR] Worker process {{worker.pid}} exit with exception. Error code: {{worker.returncode}}.", flush=True)
scheduler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
scheduler.wait()
"""


def test_msrun_mode_passes_on_a_worker_exit_2(tmp_path):
    """A worker that refused bad input (one line, exit 2: a data error found once the data is read) makes launch
    exit 2 too, as `train` does (it was msrun's 1)."""
    msrun = tmp_path / "msrun"
    msrun.write_text(FAKE_MSRUN.replace("sys.exit(1)", "sys.exit(2)").format(python=sys.executable))
    msrun.chmod(msrun.stat().st_mode | stat.S_IEXEC)
    log_dir = tmp_path / "logs"
    plan = LaunchPlan("msrun", [ProcessSpec([str(msrun), f"--log_dir={log_dir}"])], log_dir, 2, 2,
                      cluster_timeout_s=300, failure_grace_s=1)
    result = run_plan(plan, poll_s=0.1)
    assert (result.returncode, result.failed_rank) == (2, 1)
    assert "rank 1: worker exited with code 2" in result.report()


def test_msrun_mode_kills_a_job_whose_scheduler_hangs_after_a_failure(tmp_path, capsys):
    msrun = tmp_path / "msrun"
    msrun.write_text(FAKE_MSRUN.format(python=sys.executable))
    msrun.chmod(msrun.stat().st_mode | stat.S_IEXEC)
    log_dir = tmp_path / "logs"
    plan = LaunchPlan("msrun", [ProcessSpec([str(msrun), f"--log_dir={log_dir}"])], log_dir, 2, 2,
                      cluster_timeout_s=300, failure_grace_s=1)
    start = time.monotonic()
    result = run_plan(plan, poll_s=0.1)
    assert time.monotonic() - start < 20
    # the failed worker's own exit status (1 here; a worker refusing bad input exits 2, and so does launch)
    assert result.returncode == 1 and result.failed_rank == 1
    assert "RuntimeError: injected" in result.report()
    assert "did not stop within cluster.failure_grace_s=1" in result.reason
    leftovers = subprocess.run(["pgrep", "-f", "time.sleep\\(300\\)"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), "the fake scheduler was left running"


# A worker that stops like the trainer on SIGINT/SIGTERM (exit 128 + signal); rank 1 presses Ctrl-C at the
# launcher ($LAUNCHER_PID, else its parent) once both ranks are up, `presses` times.
STOPPING_WORKER = """
import os, signal, sys, time
rank = int(os.environ["RANK_ID"])
def stop(signum, frame):
    print(f"rank {{rank}} checkpointed", flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop if {stops} else signal.SIG_IGN)
signal.signal(signal.SIGTERM, stop if {stops} else signal.SIG_DFL)
if rank == 1:
    time.sleep(2)
    for _ in range({presses}):
        os.kill(int(os.environ.get("LAUNCHER_PID", os.getppid())), signal.SIGINT)
        time.sleep(0.5)
time.sleep(60)
"""


def test_direct_mode_passes_ctrl_c_on_to_every_worker_and_exits_130(tmp_path):
    worker = STOPPING_WORKER.format(stops=True, presses=1)
    start = time.monotonic()
    result = run_plan(direct_plan(tmp_path, [worker] * 2, job_timeout_s=40), poll_s=0.1)
    assert time.monotonic() - start < 30
    assert (result.returncode, result.stopped_by) == (130, signal.SIGINT), result.report()
    assert result.reason.startswith("rank 0 exited 130, rank 1 exited 130; the ranks finished the same step")
    assert result.report().startswith("launch stopped by SIGINT after")
    for rank in (0, 1):
        assert f"rank {rank} checkpointed" in (tmp_path / f"worker_{rank}.log").read_text()


def test_single_mode_passes_ctrl_c_on_to_its_process_and_exits_130(tmp_path):
    import io

    worker = STOPPING_WORKER.format(stops=True, presses=1)
    plan = LaunchPlan("single", [ProcessSpec([sys.executable, "-c", worker], {"RANK_ID": "1"})], tmp_path, 1, 1,
                      60, 40, 1)
    out = io.StringIO()
    result = run_plan(plan, out=out, poll_s=0.1)
    assert (result.returncode, result.stopped_by) == (130, signal.SIGINT), result.report()
    assert "rank 1 checkpointed" in out.getvalue()


def test_a_second_ctrl_c_kills_every_worker_at_once(tmp_path):
    worker = STOPPING_WORKER.format(stops=False, presses=2)  # workers that ignore SIGINT
    start = time.monotonic()
    result = run_plan(direct_plan(tmp_path, [worker] * 2, job_timeout_s=40), poll_s=0.1)
    assert time.monotonic() - start < 30
    assert result.returncode == 130 and result.reason == "interrupted; all processes killed", result.report()


FAKE_MSRUN_STOPPING = """#!{python}
# Starts two workers as msrun does (MS_ROLE, RANK_ID) and reports each non-zero exit in msrun's words.
import os, subprocess, sys
log_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--log_dir=")][0]
workers = []
for rank in (0, 1):
    env = dict(os.environ, MS_ROLE="MS_WORKER", RANK_ID=str(rank), LAUNCHER_PID=str(os.getppid()))
    log = open(os.path.join(log_dir, f"worker_{{rank}}.log"), "w")
    workers.append(subprocess.Popen([sys.executable, "-c", {worker!r}], env=env, stdout=log, stderr=log))
for worker in workers:
    worker.wait()
    if worker.returncode:
        print(f"[ERROR] Worker process {{worker.pid}} exit with exception. Error code: {{worker.returncode}}.",
              flush=True)
print("Traceback (most recent call last):")
print('  File "msrun", line 8, in <module>')
print("RuntimeError: Distributed job exited with exception. Please check logs in directory: " + log_dir)
sys.exit(1)
"""


def test_msrun_mode_passes_ctrl_c_on_to_the_workers_and_reports_the_stop(tmp_path, capsys):
    msrun = tmp_path / "msrun"
    msrun.write_text(FAKE_MSRUN_STOPPING.format(python=sys.executable,
                                                worker=STOPPING_WORKER.format(stops=True, presses=1)))
    msrun.chmod(msrun.stat().st_mode | stat.S_IEXEC)
    log_dir = tmp_path / "logs"
    plan = LaunchPlan("msrun", [ProcessSpec([str(msrun), f"--log_dir={log_dir}"])], log_dir, 2, 2,
                      cluster_timeout_s=300, job_timeout_s=40, failure_grace_s=1)
    start = time.monotonic()
    result = run_plan(plan, poll_s=0.1)
    assert time.monotonic() - start < 30
    assert (result.returncode, result.stopped_by) == (130, signal.SIGINT), result.report()
    assert result.reason.startswith("rank 0 exited 130, rank 1 exited 130; the ranks finished the same step")
    assert "Traceback" not in capsys.readouterr().out  # msrun's closing traceback of a stopped job is left out


def test_missing_msrun_is_a_launch_error(tmp_path):
    plan = LaunchPlan("msrun", [ProcessSpec([str(tmp_path / "no-msrun")])], tmp_path, 2, 2, cluster_timeout_s=60)
    with pytest.raises(LaunchError, match="msrun comes with mindspore"):
        run_plan(plan)


def test_msrun_mode_job_timeout_kills_a_hung_job(tmp_path):
    msrun = tmp_path / "msrun"
    msrun.write_text(f"#!{sys.executable}\nimport subprocess\n"
                     "subprocess.Popen(['sleep', '301'], start_new_session=True).wait()\n")
    msrun.chmod(msrun.stat().st_mode | stat.S_IEXEC)
    plan = LaunchPlan("msrun", [ProcessSpec([str(msrun)])], tmp_path, 2, 2, cluster_timeout_s=300, job_timeout_s=1)
    start = time.monotonic()
    result = run_plan(plan, poll_s=0.1)
    assert time.monotonic() - start < 15
    assert result.returncode == TIMEOUT_EXIT and "cluster.job_timeout_s=1" in result.report()
    leftovers = subprocess.run(["pgrep", "-f", "sleep 301"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), "the hung worker was left running"


# ---- shell scripts ---------------------------------------------------------------------------------------------

def sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("script", ["msrun_launch.sh", "rank_table_launch.sh"])
def test_scripts_have_help(script):
    done = sh(str(REPO / "scripts" / script), "--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage:")


def test_msrun_script_dry_run_quotes_arguments():
    """Also the kernel threads of workers sharing the node, as `launch` sets them (OMP_NUM_THREADS = cores //
    workers unless the environment or --env sets it)."""
    script = str(REPO / "scripts" / "msrun_launch.sh")
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = sh(script, "--nodes", "2", "--workers", "8", "--node-rank", "1", "--master-addr", "10.0.0.1", "--env",
              "HCCL_CONNECT_TIMEOUT=600", "--dry-run", "--", "train.py", "--name", "a b;rm -rf x", env=clean)
    assert done.returncode == 0, done.stderr
    threads = max(1, len(os.sched_getaffinity(0)) // 8)
    assert done.stdout.strip() == (f"HCCL_CONNECT_TIMEOUT=600 OMP_NUM_THREADS={threads} msrun --worker_num=16 "
                                   "--local_worker_num=8 "
                                   "--master_addr=10.0.0.1 --master_port=8118 --node_rank=1 --log_dir=msrun_log "
                                   "--join=True --cluster_time_out=600 train.py --name a\\ b\\;rm\\ -rf\\ x")
    given = sh(script, "--workers", "2", "--env", "OMP_NUM_THREADS=3", "--dry-run", "--", "t.py", env=clean).stdout
    inherited = sh(script, "--workers", "2", "--dry-run", "--", "t.py", env={**clean, "OMP_NUM_THREADS": "5"}).stdout
    assert given.startswith("OMP_NUM_THREADS=3 msrun ") and inherited.startswith("msrun ")
    for env, args in (({**clean, "OMP_NUM_THREADS": "abc"}, ()), (clean, ("--env", "OMP_NUM_THREADS=0"))):
        refused = sh(script, "--workers", "2", *args, "--dry-run", "--", "t.py", env=env)
        assert refused.returncode == 2 and refused.stdout == "", refused.stdout
        assert refused.stderr.count("\n") == 1 and "OMP_NUM_THREADS=" in refused.stderr
        assert "must be a positive integer" in refused.stderr
    bad = sh(script, "--nodes", "2", "--dry-run", "--", "train.py")
    assert bad.returncode == 2 and "master-addr" in bad.stderr


def test_rank_table_script_reports_the_failed_rank(tmp_path):
    worker = ('echo "rank $RANK_ID device $DEVICE_ID"; '
              'if [ "$RANK_ID" = 2 ]; then sleep 1; echo boom; exit 5; fi; sleep 30')
    start = time.monotonic()
    done = sh(str(REPO / "scripts" / "rank_table_launch.sh"), "--rank-table",
              str(REPO / "hccl_configs" / "hccl_910b_1x8.json"), "--log-dir", str(tmp_path), "--", "sh", "-c", worker)
    assert time.monotonic() - start < 20
    assert done.returncode == 5 and "rank 2 exited with status 5" in done.stderr and "boom" in done.stderr
    assert (tmp_path / "worker_7.log").read_text().startswith("rank 7 device 7")
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    table = str(REPO / "hccl_configs" / "hccl_910b_1x8.json")
    lines = sh(str(REPO / "scripts" / "rank_table_launch.sh"), "--rank-table", table, "--dry-run", "--", "true",
               env=clean).stdout.splitlines()  # 8 processes on this node share its cores, as under `launch`
    assert len(lines) == 8 and all(line.startswith(f"OMP_NUM_THREADS={max(1, len(os.sched_getaffinity(0)) // 8)} "
                                                   "RANK_TABLE_FILE=") for line in lines)
    given = sh(str(REPO / "scripts" / "rank_table_launch.sh"), "--rank-table", table, "--env", "OMP_NUM_THREADS=4",
               "--dry-run", "--", "true", env=clean).stdout.splitlines()
    assert all(line.startswith("OMP_NUM_THREADS=4 RANK_TABLE_FILE=") for line in given)
    refused = sh(str(REPO / "scripts" / "rank_table_launch.sh"), "--rank-table", table, "--dry-run", "--", "true",
                 env={**clean, "OMP_NUM_THREADS": "\u00b2"})
    assert refused.returncode == 2 and "OMP_NUM_THREADS='\u00b2': must be a positive integer" in refused.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "9"}')
    done = sh(str(REPO / "scripts" / "rank_table_launch.sh"), "--rank-table", str(bad), "--dry-run", "--", "true")
    assert done.returncode == 2 and "version" in done.stderr


def test_preflight_refuses_a_recipe_that_cannot_fit_on_910b_and_can_be_told_to_skip():
    overrides = ["experiment=llama3_8b_910b", "data.seq_len=8192", "attention=naive", "train.recompute=none"]
    with pytest.raises(ConfigError) as info:
        preflight(compose_recipe(overrides))
    assert info.value.field == "memory per device" and "smallest change that fits" in str(info.value)
    preflight(compose_recipe([*overrides, "train.memory_check=false"]))
    preflight(compose_recipe(["experiment=llama3_8b_910b"]))  # the shipped recipe fits


def test_data_parallel_degree_fills_the_world_unless_set():
    assert compose_recipe(["cluster=cpu_2proc"]).parallel.data_parallel_degree == 2
    assert compose_recipe([]).parallel.data_parallel_degree == 1
    assert compose_recipe(["cluster=cpu_4proc", "parallel.tensor_parallel_degree=2"]).parallel.data_parallel_degree == 2
    with pytest.raises(ConfigError) as info:
        compose_recipe(["cluster=cpu_2proc", "parallel.data_parallel_degree=1"])  # explicit and disagreeing
    assert info.value.field == "parallel.data_parallel_degree"


@pytest.mark.parametrize("cluster, layout, workers", [("cpu_2proc", "dp2", 2), ("cpu_4proc", "tp2_dp2", 4)])
def test_workers_sharing_a_node_share_its_cores(monkeypatch, cluster, layout, workers):
    """OMP_NUM_THREADS = cores // local workers (at least 1) for every worker; a value in the launcher's
    environment or in cluster.env wins; one process gets none (its trainer uses every core)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    layout = f"parallel={layout}"
    assert plan_for([f"cluster={cluster}", layout]).processes[0].env["OMP_NUM_THREADS"] == str(max(1, cores // workers))
    assert plan_for([f"cluster={cluster}", layout, "+cluster.env.OMP_NUM_THREADS=3"]).processes[0].env[
        "OMP_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in plan_for(["train.num_steps=3"]).processes[0].env
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # inherited by msrun's workers as it is
    assert "OMP_NUM_THREADS" not in plan_for([f"cluster={cluster}", layout]).processes[0].env
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # empty: unset
    assert plan_for([f"cluster={cluster}", layout]).processes[0].env["OMP_NUM_THREADS"] == str(max(1, cores // workers))
    monkeypatch.setenv("OMP_NUM_THREADS", "all")  # refused before msrun starts, not by every worker
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS='all': must be a positive integer"):
        plan_for([f"cluster={cluster}", layout])
    monkeypatch.delenv("OMP_NUM_THREADS")
    with pytest.raises(ConfigError) as info:  # the value the workers would get is checked, wherever it comes from
        plan_for([f"cluster={cluster}", layout, "+cluster.env.OMP_NUM_THREADS=abc"])
    assert info.value.field == "cluster.env.OMP_NUM_THREADS"


def test_the_cpu_clusters_beat_every_second_and_the_910b_ones_keep_mindspores_interval():
    """cluster.heartbeat_s -> MS_RETRY_INTERVAL_LOWER and _UPPER (MindSpore draws each heartbeat interval between
    them; default 3 and 5 s): 1 for the local CPU recipes, unset for the 910B ones; cluster.env wins."""
    env = plan_for(["cluster=cpu_4proc", "parallel=tp2_dp2"]).processes[0].env
    assert (env["MS_RETRY_INTERVAL_LOWER"], env["MS_RETRY_INTERVAL_UPPER"]) == ("1", "1")
    env = plan_for(["cluster=cpu_2proc", "parallel=dp2", "cluster.heartbeat_s=2"]).processes[0].env
    assert (env["MS_RETRY_INTERVAL_LOWER"], env["MS_RETRY_INTERVAL_UPPER"]) == ("2", "2")
    env = plan_for(["cluster=cpu_2proc", "parallel=dp2", "+cluster.env.MS_RETRY_INTERVAL_UPPER=4"]).processes[0].env
    assert (env["MS_RETRY_INTERVAL_LOWER"], env["MS_RETRY_INTERVAL_UPPER"]) == ("1", "4")
    env = plan_for(["cluster=910b_1x8", "parallel=dp8", "runtime=ascend"]).processes[0].env
    assert "MS_RETRY_INTERVAL_LOWER" not in env and "MS_RETRY_INTERVAL_UPPER" not in env


def test_kernel_threads_come_from_the_recipe_then_omp_num_threads_then_the_cores(monkeypatch):
    from ascend_llm.config.runtime import RuntimeConfig
    from ascend_llm.train.runtime import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads(RuntimeConfig()) == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads(RuntimeConfig()) == 3
    assert cpu_threads(RuntimeConfig(num_threads=2)) == 2
    for value, threads in ((" 4 ", 4), ("4,2", 4), ("1,1", 1), ("", len(os.sched_getaffinity(0)))):
        monkeypatch.setenv("OMP_NUM_THREADS", value)  # OpenMP's nested list: its first entry; empty: unset
        assert cpu_threads(RuntimeConfig()) == threads, value
    for bad in ("0", "two", "-1", "1.5", "\u00b2", "\u0663", ",2"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(ConfigError, match="must be a positive integer") as info:
            cpu_threads(RuntimeConfig())  # superscript and Arabic-Indic digits too: ASCII digits only
        assert info.value.field == "OMP_NUM_THREADS"


def test_a_bad_omp_num_threads_is_one_line_exit_2_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "train", "debug=smoke",
                           f"train.output_dir={run}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "many"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [  # one line: checked before MindSpore's OpenMP runtime loads
        "config error: OMP_NUM_THREADS='many': must be a positive integer, or OpenMP's list form like 4,2 (its "
        "first entry counts): the CPU kernel threads of each process"], done.stderr
    assert not run.exists()
