"""`ascend-llm bench parallel`, the parts that need no job: option checks (one line naming the option, exit 2,
nothing written), the longest-length search against a brute-force scan, the table row and JSON shape, and the
planner rows (labelled as estimates) against the planner itself called directly."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ascend_llm.bench import parallel as bench
from ascend_llm.errors import UserInputError

BAD = [
    (["--layouts", "tp2,tp8"], "--layouts='tp2,tp8'"),
    (["--parts", "layouts,speed"], "--parts='layouts,speed'"),
    (["--steps", "0"], "--steps=0"),
    (["--warmup", "-1"], "--warmup=-1"),
    (["--global-batch", "3", "--layouts", "dp2"], "--global-batch=3"),
    (["--seq-len", "30", "--layouts", "cp2"], "--seq-len=30"),
    (["--memory-cap-gib", "0"], "--memory-cap-gib=0.0"),
    (["--seq-unit", "1022"], "--seq-unit=1022"),
    (["--max-seq-len", "512", "--seq-unit", "1024"], "--max-seq-len=512"),
]


@pytest.mark.parametrize("argv,named", BAD)
def test_bad_option_is_one_line_naming_it_and_writes_nothing(tmp_path, argv, named):
    out = tmp_path / "out.json"
    with pytest.raises(UserInputError) as caught:
        bench.main([*argv, "--json", str(out)])
    line = caught.value.one_line()
    assert "\n" not in line and line.startswith(f"config error: {named}:"), line
    assert list(tmp_path.iterdir()) == []


def test_cli_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "bench", "parallel", "--steps", "0",
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "config error: --steps=0: must be >= 1", done.stderr
    assert list(tmp_path.iterdir()) == []


def test_odd_batch_and_seq_are_fine_when_no_layout_splits_them():
    args = bench.build_parser().parse_args(["--layouts", "single", "--global-batch", "3", "--seq-len", "30",
                                            "--parts", "layouts"])
    assert bench.validate(args) == ["single"]


def test_four_workers_adds_the_2x2_layouts_once():
    args = bench.build_parser().parse_args(["--layouts", "tp2,cp2_dp2", "--four-workers"])
    assert bench.validate(args) == ["tp2", "cp2_dp2", "tp2_dp2"]
    assert bench.LAYOUTS["tp2_dp2"][0] == bench.LAYOUTS["cp2_dp2"][0] == 4


def brute_force(limit_len: int, unit: int, max_len: int) -> int:
    return max([n for n in range(unit, max_len + 1, unit) if n <= limit_len], default=0)


@pytest.mark.parametrize("limit_len", [0, 3, 4, 5, 100, 1023, 1024, 1025, 4000, 8191, 8192, 9999, 10**6])
@pytest.mark.parametrize("unit,max_len", [(4, 8192), (1024, 8192), (12, 1000)])
def test_longest_fitting_equals_a_full_scan(limit_len, unit, max_len):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= limit_len

    best, trials = bench.longest_fitting(fits, unit, max_len)
    assert best == brute_force(limit_len, unit, max_len)
    assert [n for n, _ in trials] == calls and len(set(calls)) == len(calls)  # no length tried twice
    assert all(n % unit == 0 and unit <= n <= max_len for n in calls)
    assert all(ok == (n <= limit_len) for n, ok in trials)
    # doubling then bisection: about 2 log2(max_len / unit) trials, far fewer than the scan
    assert len(calls) <= 2 * (max_len // unit).bit_length() + 1


def test_layout_row_takes_rank0_times_and_every_rank_peak():
    ranks = [{"step_ms": [10.0, 30.0, 20.0], "comm_ms": 5.0, "num_calls": 14, "num_bytes": 3 * 2**20,
              "by_kind": {"AllReduce": 14}, "sequence": [], "peak_rss_mib": 700.4},
             {"step_ms": [99.0], "comm_ms": 9.0, "num_calls": 14, "num_bytes": 0, "by_kind": {}, "sequence": [],
              "peak_rss_mib": 810.6}]
    args = SimpleNamespace(model="debug", global_batch=8, seq_len=256)
    row = bench.layout_row("tp2", ranks, args)
    assert row["step_ms"] == 20.0 and row["comm_ms"] == 5.0 and row["comm_share"] == "25%"
    assert row["comm_MiB"] == 3.0 and row["peak_rss_mib"] == "700/811" and row["max_peak_mib"] == 811
    assert set(bench.LAYOUT_COLUMNS) <= set(row)


def test_planner_rows_are_labelled_estimates_and_match_the_planner():
    from ascend_llm.compose import compose_recipe
    from ascend_llm.parallel.plan import plan_recipe

    rows = bench.planner_rows()
    assert len(rows) == len(bench.PLANNER_LAYOUTS)
    for row, (_, overrides) in zip(rows, bench.PLANNER_LAYOUTS):
        assert "estimate" in row["source"] and "not measured" in row["source"]
        planned = plan_recipe(compose_recipe(overrides))
        assert row["memory_gib_per_npu"] == round(planned.memory.total_bytes / 2**30, 1)
        assert row["dp"] * row["tp"] * row["cp"] == 8 and row["model"] == "llama3_8b"
        assert set(bench.PLANNER_COLUMNS) <= set(row)


def test_report_prints_tables_and_writes_json_atomically(tmp_path, capsys):
    path = tmp_path / "sub" / "parallel.json"
    args = SimpleNamespace(model="debug", global_batch=8, seq_len=256, steps=3, warmup=1, memory_cap_gib=1.0,
                           seq_unit=512, json=str(path))
    layout = {c: 1 for c in bench.LAYOUT_COLUMNS} | {"layout": "tp2"}
    search = {c: 1 for c in bench.SEARCH_COLUMNS} | {"context_parallel": "cp2"}
    bench.report({"layouts": [layout], "search": [search], "planner": bench.planner_rows()}, args)
    out = capsys.readouterr().out
    assert "planner estimates" in out and "not measurements" in out and "VmHWM" in out
    data = json.loads(path.read_text())
    assert data["benchmark"] == "parallel" and [p.name for p in path.parent.iterdir()] == ["parallel.json"]
    assert [r["part"] for r in data["rows"]] == ["layouts", "search"] + ["planner"] * len(bench.PLANNER_LAYOUTS)


def test_help_lists_parallel_among_benchmarks():
    done = subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", "bench", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "parallel" in done.stdout and "collectives" not in done.stdout
