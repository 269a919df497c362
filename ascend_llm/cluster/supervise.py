"""Run a LaunchPlan and watch it: name the rank that failed, show its log tail, never hang.

msrun (`--join=True`) notices a worker that exits non-zero within a second and kills the other workers,
but then waits for its scheduler, which only gives up after `--cluster_time_out`. The watchdog here
follows msrun's output; once a worker has failed it allows `cluster.failure_grace_s` for msrun to stop and
then kills the whole process tree (msrun, scheduler, workers, `tail -f`). `cluster.job_timeout_s` bounds
the whole job. In rank-table mode this module starts the workers itself and stops the rest as soon as one
fails.

SIGINT (Ctrl-C) or SIGTERM to the launcher is passed on to every worker (`StopForwarder`): each finishes its step,
the ranks checkpoint it together and exit 128 + signal (train/stop.py); the launcher waits for them, says so and
exits with the same status. A second signal kills every process at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

import psutil

from ascend_llm.cluster.launch import LaunchPlan, ProcessSpec, check_port_free
from ascend_llm.errors import LaunchError

WORKER_FAILED = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")
WORKER_STARTED = re.compile(r"Start worker process with rank id:(\S+), log file:(.+?)\. Environment")
TIMEOUT_EXIT = 124
TAIL_LINES = 30
NOISE = ("[INFO]", "[DEBUG]", "[WARNING]")  # MindSpore's own log lines; [ERROR] and [CRITICAL] are kept


@dataclass
class LaunchResult:
    returncode: int
    elapsed_s: float
    failed_rank: Optional[int] = None
    failed_log: Optional[Path] = None
    reason: str = ""
    log_tail: list[str] = field(default_factory=list)
    stopped_by: Optional[int] = None  # the signal that stopped the job (passed on to the workers)

    def report(self) -> str:
        if self.returncode == 0:
            return f"launch finished in {self.elapsed_s:.1f} s"
        if self.stopped_by is not None:
            return (f"launch stopped by {signal.Signals(self.stopped_by).name} after {self.elapsed_s:.1f} s "
                    f"(exit {self.returncode}): {self.reason}")
        who = f"rank {self.failed_rank}" if self.failed_rank is not None else "a worker"
        lines = [f"launch failed after {self.elapsed_s:.1f} s (exit {self.returncode}): {who}: {self.reason}"]
        if self.failed_log is not None:
            lines.append(f"--- last {len(self.log_tail)} lines of {self.failed_log} ---")
            lines += self.log_tail
            lines.append("--- end of log ---")
        return "\n".join(lines)


def log_tail(path: Path, num_lines: int = TAIL_LINES) -> list[str]:
    """The last lines of a worker log without MindSpore's INFO/DEBUG/WARNING lines (all lines if nothing else)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(NOISE)]
    return (kept or lines)[-num_lines:]


def _first_log_with_error(log_dir: Path) -> tuple[Optional[int], Optional[Path]]:
    """Fallback when the failed pid is unknown: the lowest rank whose log shows a Python traceback."""
    for path in sorted(log_dir.glob("worker_*.log"), key=lambda p: int(p.stem.split("_")[-1] or 0)
                       if p.stem.split("_")[-1].isdigit() else 0):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback (most recent call last)" in text or re.search(r"^\w*Error: ", text, re.M):
            rank = path.stem.split("_")[-1]
            return (int(rank) if rank.isdigit() else None), path
    return None, None


class ProcessTree:
    """Remembers every descendant of the launched processes (workers start their own sessions)."""

    def __init__(self) -> None:
        self.known: dict[int, psutil.Process] = {}
        self.rank_of_pid: dict[int, int] = {}

    def refresh(self, roots: list[subprocess.Popen]) -> None:
        for root in roots:
            try:
                proc = psutil.Process(root.pid)
                found = [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for child in found:
                if child.pid in self.known:
                    continue
                self.known[child.pid] = child
                try:
                    env = child.environ()
                except psutil.Error:
                    continue
                if env.get("MS_ROLE") == "MS_WORKER" and env.get("RANK_ID", "").isdigit():
                    self.rank_of_pid[child.pid] = int(env["RANK_ID"])

    def kill_all(self, roots: list[subprocess.Popen], grace_s: float = 3.0) -> int:
        self.refresh(roots)
        alive = []
        for proc in self.known.values():
            try:
                if proc.is_running():
                    proc.send_signal(signal.SIGTERM)
                    alive.append(proc)
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(alive, timeout=grace_s)
        for proc in still:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(still, timeout=grace_s)
        for root in roots:
            try:
                root.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        return len(alive)


    def workers(self) -> list[psutil.Process]:
        """The msrun workers seen so far (processes with MS_ROLE=MS_WORKER), running or not."""
        return [self.known[pid] for pid in self.rank_of_pid]


class StopForwarder:
    """Context manager over a job: the first SIGINT/SIGTERM to the launcher is recorded (`received`) and `forward`
    sends it on to the workers; a second one raises KeyboardInterrupt (the callers then kill every process).
    Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.signalled: set[int] = set()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopForwarder:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def status(self) -> int:
        """The exit status of a job this signal stopped: 128 + signal number (130 before any signal)."""
        return 128 + (self.received or signal.SIGINT)

    def forward(self, procs) -> None:
        """Send the received signal, once, to each of `procs` (psutil.Process or Popen) still running."""
        if self.received is None:
            return
        for proc in procs:
            if proc.pid in self.signalled:
                continue
            self.signalled.add(proc.pid)
            try:
                proc.send_signal(self.received)
            except (psutil.Error, OSError):
                pass



def stopped_result(signum: int, elapsed_s: float, codes: dict[str, int]) -> LaunchResult:
    """The result (exit 128 + signum) of a job a signal stopped: `codes` {"rank N": exit status} of the workers
    that reported one; the reason says whether each exited as a stopped trainer does (after the checkpoint)."""
    expected = 128 + int(signum)
    listed = ", ".join(f"{who} exited {code}" for who, code in sorted(codes.items())) or "the workers exited"
    clean = bool(codes) and all(code == expected for code in codes.values())
    reason = (f"{listed}; {'the ranks' if clean else 'not every rank'} finished the same step and checkpointed it"
              + (" (see rank 0's `stopped by` line); resume with train.resume=auto" if clean else ""))
    return LaunchResult(expected, elapsed_s, reason=reason, stopped_by=int(signum))


def _environment(plan: LaunchPlan, spec: ProcessSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    if plan.path_prefix:
        env["PATH"] = plan.path_prefix + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# MindSpore's C++ cluster layer logs `[INFO] DISTRIBUTED(pid,...)` lines in every worker whatever GLOG_v says;
# msrun relays them with the workers' output. They stay in the log files and are hidden from the console
# unless $ASCEND_LLM_LOG_LEVEL is DEBUG.
MSRUN_STOPPED = re.compile(r"^RuntimeError: Distributed job exited with exception")  # msrun's last words
MINDSPORE_INFO = re.compile(r"^\[(INFO|DEBUG)\] [A-Z_]+\(\d+,")


def mindspore_info_hidden() -> bool:
    return os.environ.get("ASCEND_LLM_LOG_LEVEL", "INFO").upper() != "DEBUG"


def run_plan(plan: LaunchPlan, out: TextIO = sys.stdout, poll_s: float = 0.5) -> LaunchResult:
    """Start the plan's processes and supervise them until they finish, fail, or time out."""
    if plan.master is not None:
        check_port_free(*plan.master)
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    with StopForwarder() as stop:
        if plan.mode == "single":
            return run_single(plan, poll_s, out, stop)
        if plan.mode == "rank_table":
            return _run_direct(plan, out, poll_s, stop)
        return _run_msrun(plan, out, poll_s, stop)


def _run_msrun(plan: LaunchPlan, out: TextIO, poll_s: float, stop: Optional[StopForwarder] = None) -> LaunchResult:
    spec, stop = plan.processes[0], stop or StopForwarder()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(spec.argv, env=_environment(plan, spec), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True, errors="replace",
                                bufsize=1)
    except OSError as exc:
        raise LaunchError("msrun", spec.argv[0], f"cannot start it ({exc.strerror or exc}); msrun comes with "
                          "mindspore: install it in this environment or put msrun on PATH") from None
    failures: list[tuple[int, int, float]] = []  # (pid, code, when)
    logs: dict[int, Path] = {}
    reader = threading.Thread(target=_pump_msrun, args=(proc, out, failures, logs, stop), daemon=True)
    reader.start()
    tree = ProcessTree()
    try:
        code, reason = _watch_msrun(plan, proc, tree, failures, stop, start, poll_s)
    except KeyboardInterrupt:
        tree.kill_all([proc])
        reader.join(timeout=5)
        return LaunchResult(stop.status, time.monotonic() - start, reason="interrupted; all processes killed")
    reader.join(timeout=5)
    returncode = proc.wait()
    elapsed = time.monotonic() - start
    stopped_by = stop.received
    if stopped_by is None and failures and all(c in (130, 143) for _, c, _ in failures):
        stopped_by = failures[0][1] - 128  # a worker got the signal itself (a scheduler's SIGTERM to one rank)
    if stopped_by is not None and code is None:
        labels = {pid: f"rank {tree.rank_of_pid[pid]}" if pid in tree.rank_of_pid else f"pid {pid}"
                  for pid, _, _ in failures}
        return stopped_result(stopped_by, elapsed, {labels[pid]: exit_code for pid, exit_code, _ in failures})
    if code is None and returncode == 0 and not failures:
        return LaunchResult(0, elapsed)
    if code is None:  # the first failed worker's own status, as in rank-table mode (2: it refused bad input)
        first = failures[0][1] if failures else 0
        code = first if first > 0 else returncode if returncode not in (0, None) else 1
    rank = log = None
    if failures:
        pid, exit_code, _ = failures[0]
        rank = tree.rank_of_pid.get(pid)
        what = f"worker exited with code {exit_code}" + (f" (pid {pid})" if rank is None else "")
        reason = what + ("; " + reason if reason else "")
    elif not reason:
        reason = f"msrun exited with code {returncode}"
    if rank is not None:
        log = logs.get(rank, plan.log_dir / f"worker_{rank}.log")
    else:
        rank, log = _first_log_with_error(plan.log_dir)
    if log is not None and not log.is_absolute():
        log = (plan.log_dir / log.name) if not log.exists() else log.absolute()
    return LaunchResult(code, elapsed, rank, log, reason, log_tail(log) if log is not None else [])


def _pump_msrun(proc: subprocess.Popen, out: TextIO, failures: list, logs: dict[int, Path],
                stop: StopForwarder) -> None:
    """Relay msrun's output (without MindSpore's INFO chatter); note failed workers and worker log files. In a
    job a signal stopped (the launcher's, or a worker's own: exit status 130/143), msrun's own closing traceback
    (such an exit is an "exception" to it) is left out; any other traceback is shown."""
    assert proc.stdout is not None
    quiet = mindspore_info_hidden()
    held: list[str] = []  # a traceback being read while stopping

    def stopping() -> bool:
        return stop.received is not None or (bool(failures) and all(c in (130, 143) for _, c, _ in failures))

    for line in proc.stdout:
        if held or (line.startswith("Traceback (most recent call last)") and stopping()):
            held.append(line)
            if MSRUN_STOPPED.match(line):
                held = []
            elif not line.startswith((" ", "Traceback")):
                out.writelines(held)
                held = []
        elif not (quiet and MINDSPORE_INFO.match(line)):
            out.write(line)
        match = WORKER_FAILED.search(line)
        if match:
            failures.append((int(match.group(1)), int(match.group(2)), time.monotonic()))
        match = WORKER_STARTED.search(line)
        if match and match.group(1).isdigit():
            logs[int(match.group(1))] = Path(match.group(2))
    out.flush()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _watch_msrun(plan: LaunchPlan, proc: subprocess.Popen, tree: ProcessTree, failures: list,
                 stop: StopForwarder, start: float, poll_s: float) -> tuple[Optional[int], str]:
    """Poll until msrun exits; (exit code to report or None, reason). Kills the tree on the job timeout, when
    msrun lingers cluster.failure_grace_s after a failed worker, or after every worker of a stopped job ended."""
    workers_done_at = None
    while proc.poll() is None:
        tree.refresh([proc])
        stop.forward(tree.workers())
        now = time.monotonic()
        if plan.job_timeout_s is not None and now - start > plan.job_timeout_s:
            killed = tree.kill_all([proc])
            return TIMEOUT_EXIT, f"job timed out after cluster.job_timeout_s={plan.job_timeout_s} s; killed " \
                                 f"{killed} process(es)"
        if stop.received is not None:  # stopping: the workers checkpoint and exit; then msrun may linger
            if workers_done_at is None and tree.workers() and not any(map(_alive, tree.workers())):
                workers_done_at = now
            if workers_done_at is not None and now - workers_done_at > plan.failure_grace_s:
                tree.kill_all([proc])
                return None, ""
        elif failures and now - failures[0][2] > plan.failure_grace_s:
            killed = tree.kill_all([proc])
            return None, (f"msrun did not stop within cluster.failure_grace_s={plan.failure_grace_s} s after the "
                          f"failure; killed {killed} process(es)")
        time.sleep(poll_s)
    return None, ""


def _run_direct(plan: LaunchPlan, out: TextIO, poll_s: float, stop: Optional[StopForwarder] = None) -> LaunchResult:
    """Rank-table mode: one process per local device, each writing its own log."""
    start, stop = time.monotonic(), stop or StopForwarder()
    procs: list[tuple[ProcessSpec, subprocess.Popen]] = []
    handles = []
    tree = ProcessTree()
    try:
        for spec in plan.processes:
            assert spec.log_path is not None
            handle = open(spec.log_path, "w", encoding="utf-8")
            handles.append(handle)
            procs.append((spec, subprocess.Popen(spec.argv, env=_environment(plan, spec), stdout=handle,
                                                 stderr=subprocess.STDOUT, start_new_session=True)))
            out.write(f"started rank {spec.rank} (pid {procs[-1][1].pid}), log {spec.log_path}\n")
        out.flush()
        roots = [p for _, p in procs]
        while True:
            tree.refresh(roots)
            stop.forward(roots)
            if stop.received is not None:  # stopping: wait for every worker to checkpoint and exit
                if all(p.poll() is not None for p in roots):
                    return stopped_result(stop.received, time.monotonic() - start,
                                          {f"rank {s.rank}": p.returncode for s, p in procs})
                time.sleep(poll_s)
                continue
            failed = [(s, p.returncode) for s, p in procs if p.poll() not in (None, 0)]
            if failed:
                spec, rc = failed[0]
                tree.kill_all(roots)
                return LaunchResult(rc if rc > 0 else 1, time.monotonic() - start, spec.rank, spec.log_path,
                                    f"worker exited with code {rc}; stopped the others", log_tail(spec.log_path))
            if all(p.poll() == 0 for p in roots):
                return LaunchResult(0, time.monotonic() - start)
            if plan.job_timeout_s is not None and time.monotonic() - start > plan.job_timeout_s:
                killed = tree.kill_all(roots)
                return LaunchResult(TIMEOUT_EXIT, time.monotonic() - start,
                                    reason=f"job timed out after cluster.job_timeout_s={plan.job_timeout_s} s; "
                                    f"killed {killed} process(es)")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        tree.kill_all([p for _, p in procs])
        return LaunchResult(stop.status, time.monotonic() - start, reason="interrupted; all processes killed")
    finally:
        for handle in handles:
            handle.close()


def run_single(plan: LaunchPlan, poll_s: float = 0.5, out: Optional[TextIO] = None,
               stop: Optional[StopForwarder] = None) -> LaunchResult:
    """World size 1: run the one process. On a terminal its output goes straight to it (progress bars); into
    a pipe or file the launcher relays it, so a reader that goes away early (`| head`) never stops the job:
    the launcher keeps draining the process's output to the end. A signal `stop` received is passed on."""
    spec, stop = plan.processes[0], stop or StopForwarder()
    start = time.monotonic()
    relay = out is not None and not out.isatty()
    proc = subprocess.Popen(spec.argv, env=_environment(plan, spec), start_new_session=True,
                            stdout=subprocess.PIPE if relay else None, stderr=subprocess.STDOUT if relay else None,
                            text=True, errors="replace", bufsize=1)
    pump = threading.Thread(target=_relay, args=(proc.stdout, out), daemon=True) if relay else None
    if pump is not None:
        pump.start()
    tree = ProcessTree()
    try:
        while proc.poll() is None:
            tree.refresh([proc])
            stop.forward([proc])
            if plan.job_timeout_s is not None and time.monotonic() - start > plan.job_timeout_s:
                killed = tree.kill_all([proc])
                return LaunchResult(TIMEOUT_EXIT, time.monotonic() - start, 0,
                                    reason=f"job timed out after cluster.job_timeout_s={plan.job_timeout_s} s; "
                                    f"killed {killed} process(es)")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        tree.kill_all([proc])
        return LaunchResult(stop.status, time.monotonic() - start, reason="interrupted")
    if pump is not None:
        pump.join(timeout=10)
    rc = proc.returncode
    if stop.received is not None:
        return stopped_result(stop.received, time.monotonic() - start, {"rank 0": rc})
    return LaunchResult(0 if rc == 0 else (rc if rc > 0 else 1), time.monotonic() - start,
                        None if rc == 0 else 0, reason="" if rc == 0 else f"the process exited with code {rc}")


def _relay(stream, out: TextIO) -> None:
    for line in stream:
        try:
            out.write(line)
        except BrokenPipeError:  # a plain stream whose reader left: keep draining, drop the output
            pass
    try:
        out.flush()
    except BrokenPipeError:
        pass
