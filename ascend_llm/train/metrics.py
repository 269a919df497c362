"""Per-step metrics (metrics.jsonl, tolerant of torn lines), throughput and MFU, model FLOPs, the loss plot."""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from ascend_llm.store.files import write_file_atomic

logger = logging.getLogger("ascend_llm.train")


def read_records(path: Path) -> list[dict]:
    """The JSON records of a metrics.jsonl; a torn or garbled line (a job killed mid-append) is skipped with a
    warning, never fatal."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            logger.warning("%s:%d: skipping a torn or unreadable line (%d chars)", path, number, len(line))
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed per record. On resume the file is
    rewritten (atomically) without records past the resumed step and without torn lines."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        write_file_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return read_records(self.path)


def process_age_s() -> float:
    """Seconds since this process was started (launch time of `ascend-llm train`), 10 ms resolution.

    Linux: CLOCK_BOOTTIME now minus the start time in /proc/self/stat (both counted from boot). Not psutil's
    `time.time() - create_time()`: create_time adds the boot time, which /proc/stat gives in whole seconds,
    so that age is off by up to a second (0.84 s too long on the machine this was written on). Elsewhere it
    falls back to psutil."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        return time.time() - psutil.Process().create_time()


class Throughput:
    """Tokens/s and MFU over the training time between log steps, excluding paused time (validation,
    checkpoints, sampling). The first step of a process includes graph compilation: it is reported as
    `compile_and_first_step_s`, not as throughput.

    MFU = flops_per_token * tokens_per_s / peak_flops, with peak_flops = declared peak FLOP/s per device times
    the number of devices (PaLM, Chowdhery et al. 2022, appendix B)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.started = time.perf_counter()
        self.first_step_s: float | None = None
        self.launch_to_first_step_s: float | None = None  # from the process's start (see process_age_s)
        self.window_start, self.window_tokens = self.started, 0
        self.last_tokens_per_s = 0.0

    def step_done(self) -> None:
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self.started
            self.launch_to_first_step_s = process_age_s()
            self.window_start, self.window_tokens = now, 0
        else:
            self.window_tokens += self.tokens_per_step

    @contextmanager
    def pause(self):
        """Time inside this context is not training time."""
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - paused

    def take(self) -> dict:
        """The window's {"tokens_per_s", "mfu"} (or {"compile_and_first_step_s"} for the first step); resets it."""
        now = time.perf_counter()
        if self.window_tokens:
            self.last_tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
            out = {"tokens_per_s": self.last_tokens_per_s,
                   "mfu": self.flops_per_token * self.last_tokens_per_s / self.peak_flops}
        else:
            out = {"compile_and_first_step_s": self.first_step_s}
        self.window_start, self.window_tokens = now, 0
        return out


def plot_loss(records: list[dict], out: Path, title: str) -> Path:
    """Train loss per step and validation loss where measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return Path(out)
