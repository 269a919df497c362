"""Recipes compose through Hydra's compose API, validate, and reject bad input naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ascend_llm.compose import compose_recipe, recipes_dir
from ascend_llm.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (recipes_dir() / "experiment").glob("*.yaml"))


def test_there_are_experiments():
    assert len(EXPERIMENTS) >= 3


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    recipe = compose_recipe([f"experiment={name}"])
    recipe.validate()
    assert recipe.data.seq_len <= recipe.model.max_seq_len


@pytest.mark.parametrize("group", ["model", "attention", "data", "optim", "train", "runtime", "precision",
                                   "parallel", "cluster", "debug"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml")):
        overrides = [f"{group}={option}"]
        if group == "cluster":
            pytest.importorskip("ascend_llm.parallel.dims")
            continue  # cluster options need matching parallel degrees: covered by the parallel tests
        if group == "parallel" and option != "single":
            continue
        compose_recipe(overrides).validate()


def test_command_line_overrides_apply_with_types():
    recipe = compose_recipe(["model=debug", "optim.lr=1e-3", "train.num_steps=50", "data.seq_len=32"])
    assert recipe.model.name == "debug" and recipe.optim.lr == 1e-3 and recipe.train.num_steps == 50
    assert recipe.data.vocab_size == recipe.model.vocab_size  # data follows the model's vocab by default


@pytest.mark.parametrize("overrides, field", [
    (["model.num_kv_heads=3"], "model.num_kv_heads"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["model.dim=0"], "model.dim"),
    (["train.num_steps=-1"], "train.num_steps"),
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["train.grad_accum_steps=3"], "train.grad_accum_steps"),
    (["train.val_batches=-1"], "train.val_batches"),  # 0 is allowed: no validation
    # a cross-group rule, so `launch` refuses it before starting workers (it failed in the workers, exit 1)
    (["objective=dpo", "objective.preference.reference=adapters_off"], "objective.preference.reference"),
    (["optim.lr=0"], "optim.lr"),
    (["runtime.mode=eager"], "runtime.mode"),
    (["train.num_steps=abc"], "train.num_steps=abc"),
    (["model=nosuch"], "model"),
])
def test_bad_config_names_field_value_and_rule(overrides, field):
    with pytest.raises(ConfigError) as info:
        compose_recipe(overrides)
    line = info.value.one_line()
    assert field in line and "\n" not in line


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("override, needle", [
    ("model.num_kv_heads=3", "model.num_kv_heads=3: must divide model.num_heads=8"),
    ("data.seq_len=2048", "data.seq_len=2048: must be <= model.max_seq_len=1024"),
    ("train.num_steps=0", "train.num_steps=0: must be > 0"),
])
def test_cli_bad_config_exits_2_with_one_line(override, needle, tmp_path):
    proc = run_cli("train", override, f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_cli_missing_data_path_exits_2(tmp_path):
    proc = run_cli("train", "model=debug", f"data.path={tmp_path / 'nope.jsonl'}", f"train.output_dir={tmp_path}/r")
    assert proc.returncode == 2
    assert "data error: data.path=" in proc.stderr and "does not exist" in proc.stderr


def test_wheel_ships_the_recipes(tmp_path):
    """A non-editable install finds its recipes: they are packaged as ascend_llm/recipes."""
    import zipfile

    from tests.conftest import ROOT

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("ascend_llm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ascend_llm/recipes/train.yaml" in names
    assert "ascend_llm/recipes/model/tiny.yaml" in names and "ascend_llm/recipes/debug/smoke.yaml" in names
    packages = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    source = {str(p.parent.relative_to(Path(__file__).resolve().parents[2])) for p in
              (Path(__file__).resolve().parents[2] / "ascend_llm").rglob("__init__.py")}
    assert source <= packages, f"packages missing from the wheel: {sorted(source - packages)}"


def test_info_reports_published_counts_and_flops(capsys):
    from ascend_llm.cli.info import main

    assert main(["model=llama2_7b", "data.seq_len=4096"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out  # Llama 2 7B: 6.74 B parameters
    # PaLM-style FLOPs/token: 6 * non-embedding params + 12 * L * h * s
    expected = 6 * (6_738_415_616 - 32000 * 4096) + 12 * 32 * 4096 * 4096
    assert f"{expected:.4g}" in out


def test_readme_states_the_tiny_model_size_the_code_builds():
    import re

    from ascend_llm.models.llama import count_params

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    stated = float(re.search(r"trains the `tiny` model \(([\d.]+) M parameters\)", readme).group(1))
    assert stated == round(count_params(compose_recipe(["model=tiny"]).model) / 1e6, 1)
