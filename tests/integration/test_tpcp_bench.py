"""`ascend-llm bench parallel` end to end on its smallest setting: one tp2 job under real msrun (2 workers, debug
model, 16 tokens), and the context-parallel search reduced to one length (cp1 in one process, cp2 under msrun).

The recorded collectives of a tp2 step are checked against Megatron's count (Shoeybi et al. 2019, sec. 3): per
transformer layer two activation all-reduces forward (the g operators after the row-parallel wo and w2) and two
backward (the f operators before the column-parallel wq/wk/wv and w1/w3), plus one forward for the
vocab-parallel embedding and one backward for the vocab-parallel output head: 4 * num_layers + 2 all-reduces of a
(batch, seq, dim) activation, and the clipping norm's one scalar all-reduce."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import raise_priority

BATCH, SEQ, DIM, LAYERS = 2, 16, 64, 2  # recipes/model/debug.yaml: dim 64, 2 layers


def test_bench_parallel_smallest_setting(tmp_path):
    out = tmp_path / "parallel.json"
    argv = [sys.executable, "-m", "ascend_llm.cli.main", "bench", "parallel", "--layouts", "tp2", "--steps", "1",
            "--warmup", "1", "--repeats", "1", "--global-batch", str(BATCH), "--seq-len", str(SEQ),
            "--memory-cap-gib", "64", "--seq-unit", "16", "--max-seq-len", "16", "--json", str(out),
            "data.max_bytes=200000", f"data.cache_dir={tmp_path / 'cache'}", "cluster.cluster_timeout_s=300"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1200, preexec_fn=raise_priority)  # msrun jobs
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not measurements" in done.stdout and "VmHWM" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    layout = next(r for r in rows if r["part"] == "layouts")
    assert layout["layout"] == "tp2" and layout["workers"] == 2
    peaks = [float(p) for p in layout["peak_rss_mib"].split("/")]
    assert len(peaks) == 2 and min(peaks) > 100  # each rank's own VmHWM (a MindSpore process holds far more)
    assert layout["step_ms"] > 0 and layout["comm_ms"] > 0
    activation = [c for c in layout["sequence"] if c[0] == "AllReduce" and c[2] == [BATCH, SEQ, DIM]]
    assert len(activation) == 4 * LAYERS + 2
    assert sum(1 for c in layout["sequence"] if c[0] == "AllReduce" and c[2] == []) == 1  # the clipping norm
    assert layout["collectives"] == len(layout["sequence"])
    search = {r["context_parallel"]: r for r in rows if r["part"] == "search"}
    for name, workers in (("cp1", 1), ("cp2", 2)):
        assert search[name]["workers"] == workers and search[name]["longest_seq_len"] == SEQ
        assert search[name]["limit"] == "max_seq_len" and [t["seq_len"] for t in search[name]["trials"]] == [SEQ]
        assert search[name]["peak_at_longest_mib"] > 100
    assert sum(1 for r in rows if r["part"] == "planner") >= 3
