"""metrics.jsonl tolerates a torn last line (a job killed mid-append); throughput excludes paused time."""

from __future__ import annotations

import json

import pytest

from ascend_llm.train import metrics as metrics_module
from ascend_llm.train.metrics import MetricsLog, Throughput, plot_loss, read_records


def write_lines(path, records, torn=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_torn_last_line_is_skipped_and_trimmed_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 9)]
    write_lines(path, records, torn='{"step": 9, "loss": 4.1')
    assert read_records(path) == records
    log = MetricsLog(path, resume_step=5)  # the resumed checkpoint is step 5
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]
    log.write({"step": 6, "loss": 1.0})
    assert path.read_text().splitlines()[-1] == '{"step": 6, "loss": 1.0}'
    plot_loss(log.records(), tmp_path / "loss.png", "t")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_garbage_in_the_middle_and_non_objects_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe garbage\n[1, 2]\n{"step": 2}\n')
    assert [r["step"] for r in read_records(path)] == [1, 2]


def test_a_fresh_log_starts_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"step": 1}])
    assert MetricsLog(path, resume_step=0).records() == []


def test_throughput_excludes_paused_time_and_reports_compile_first(monkeypatch):
    # perf_counter readings: init, step 1 done, take, step 2 done, pause in, pause out, step 3 done, take
    clock = iter([0.0, 10.0, 11.0, 12.0, 12.5, 14.5, 15.0, 16.0])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    meter = Throughput(tokens_per_step=100, flops_per_token=6.0, peak_flops=1200.0)
    meter.step_done()
    assert meter.take() == {"compile_and_first_step_s": 10.0}
    meter.step_done()
    with meter.pause():
        pass
    meter.step_done()
    out = meter.take()
    assert out["tokens_per_s"] == pytest.approx(200 / 3.0)  # 16 - 11 s minus 2 s paused
    assert out["mfu"] == pytest.approx(6.0 * (200 / 3.0) / 1200.0)
    assert meter.last_tokens_per_s == out["tokens_per_s"]


def test_pipe_safe_stream_drops_output_after_the_reader_is_gone():
    import io
    import os

    from ascend_llm.cli.streams import PipeSafeStream

    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the reader (`head`) has exited
    raw = io.TextIOWrapper(os.fdopen(write_fd, "wb", buffering=0), write_through=True)
    with pytest.raises(BrokenPipeError):
        raw.write("x" * 10)
    safe = PipeSafeStream(raw)
    assert safe.write("more\n" * 1000) == 5000 and safe.broken
    safe.write("and more")
    safe.flush()


def test_process_age_matches_the_launching_parents_clock():
    """A child that sleeps 1 s and reports its age: at least 1 s, and no more than the parent measured from
    before the launch (psutil's create_time, off by up to 1 s from the whole-second boot time, fails this)."""
    import subprocess
    import sys
    import time

    code = "import time; time.sleep(1.0); from ascend_llm.train.metrics import process_age_s; print(process_age_s())"
    before = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    elapsed = time.monotonic() - before
    age = float(out.stdout.strip().splitlines()[-1])
    assert 1.0 <= age <= elapsed + 0.02
