"""The CLI follows the bad-input rule: divergence stops with one line, a sweep with one bad value writes
nothing, and output to a pipe that closes early ends without a traceback (launch keeps draining its job)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def ascend_llm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ascend_llm.cli.main", *args]


def test_divergence_stops_with_one_line_and_no_nonfinite_checkpoint(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = subprocess.run(ascend_llm("train", "debug=smoke", "optim.lr=3000", "train.num_steps=30",
                                     "train.max_nonfinite_steps=2", "train.ckpt_every=1", "train.progress=false",
                                     f"train.output_dir={run_dir}", f"data.cache_dir={data_cache}"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at step") and "optim.lr=3000" in last
    assert "non-finite loss or gradients" in proc.stderr  # each skipped step is on the console
    import numpy as np
    from safetensors.numpy import load_file

    for checkpoint in (run_dir / "checkpoints").iterdir():
        for name in ("model", "optimizer"):
            arrays = load_file(str(checkpoint / f"{name}.safetensors"))
            assert all(np.isfinite(a).all() for a in arrays.values()), checkpoint


def test_a_sweep_with_one_bad_value_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(ascend_llm("train", "--multirun", "debug=smoke", "optim.lr=1e-3,-1",
                                     f"train.output_dir={out}"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: optim.lr=-1"), proc.stderr
    assert not out.exists()


def test_a_sweep_with_an_unknown_group_option_lists_the_options(tmp_path):
    proc = subprocess.run(ascend_llm("train", "-m", "model=debug,tinyy", f"train.output_dir={tmp_path / 's'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "model='tinyy': allowed: debug" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_output_into_a_pipe_that_closes_early(tmp_path):
    proc = subprocess.Popen(ascend_llm("info", "model=llama3_8b"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()[-2000:]


def test_launch_keeps_draining_its_job_after_the_pipe_closes(tmp_path):
    script = tmp_path / "chatty.py"
    done = tmp_path / "done.txt"
    script.write_text("import sys\nfor i in range(20000):\n    print('line', i)\n"
                      f"open({str(done)!r}, 'w').write('ok')\n")
    proc = subprocess.Popen(ascend_llm("launch", "cluster=cpu_1proc", "--script", str(script)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
    assert Path(done).read_text() == "ok"
