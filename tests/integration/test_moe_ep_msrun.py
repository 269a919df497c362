"""Expert parallel under real msrun on CPU, through the trainer (parallel/ep.py): the debug MoE model (8 experts,
top-2, aux loss 0.01) trains like one process within 1e-5 in losses and parameters with its experts sharded
over EP x DP on 4 workers (dp4 x ep2 with ZeRO-2, from step 1: the experts' optimizer state and gradients sharded
over their expert-data-parallel pair); checkpoints are layout-free, so runs resume across EP layouts: one process ->
dp2 x ep2 with ZeRO-1 on 2 workers (the optimizer state sliced), dp4 x ep2 with ZeRO-2 -> one process (gathered)
and -> dp4 x ep4 without ZeRO.

The reference is one process with train.grad_accum_steps = the data-parallel degree: its micro-batches are the
ranks' rows, so the load-balancing loss (not linear in the batch) is computed over the same tokens. The msrun runs
are part of the trainer's one msrun job per world size (trainer_runs.add_runs; workers/train_worker.py runs each
job's recipes one after the other)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import add_runs

from tests.conftest import read_records

# one pytest-xdist worker runs every test of the shared msrun jobs (tests/integration/conftest.py)
pytestmark = pytest.mark.xdist_group("msrun_jobs")
STEPS, RESUME = 6, 3
RECIPE = ["debug=smoke", "model=debug_moe", f"train.num_steps={STEPS}", "train.global_batch_size=8",
          "train.log_every=1", "train.val_batches=0", f"train.ckpt_every={RESUME}", "train.keep_last=10",
          "train.progress=false", "train.sample_tokens=0"]


def ckpt(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    records = read_records(run_dir)
    assert not any("val_loss" in r for r in records)  # train.val_batches=0: no validation
    return {r["step"]: (r["loss"], r["aux_loss"]) for r in records if "loss" in r}


def weights(run_dir: Path, step: int = STEPS) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(ckpt(run_dir, step) / "model.safetensors"))


def assert_same_run(run: Path, ref: Path, steps) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        np.testing.assert_allclose(got[step], want[step], rtol=0, atol=1e-5, err_msg=f"step {step}")
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys() and any(".experts.w1." in k for k in a)
    assert a["layers.0.feed_forward.experts.w1.weight"].shape[0] == 8  # gathered: every expert, layout-free
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=name)


def references(jobs) -> dict[str, list[str]]:
    """One process with train.grad_accum_steps = the data-parallel degree (2 and 4)."""
    return {f"ref{accum}": [*RECIPE, jobs.cache, f"train.grad_accum_steps={accum}"] for accum in (2, 4)}


def _layout(jobs, workers: int, *extra: str) -> list[str]:
    return [*RECIPE, jobs.cache, f"parallel.data_parallel_degree={workers}", "parallel.expert_parallel_degree=2",
            *extra]


def _runs2(jobs) -> dict[str, list[str]]:
    ref2 = jobs.one_process(references(jobs)["ref2"])[1]
    return {"ep2_zero1_from_ep1": _layout(jobs, 2, f"train.resume={ckpt(ref2, RESUME)}", "parallel.zero_stage=1")}


def _runs4(jobs) -> dict[str, list[str]]:
    # ep4 resumes from the ZeRO-2 run's step-3 checkpoint, written earlier in the same job
    zero2 = jobs.planned_dir("dp4_ep2_zero2")
    return {"dp4_ep2_zero2": _layout(jobs, 4, "parallel.zero_stage=2"),
            "ep4_from_ep2": _layout(jobs, 4, "parallel.expert_parallel_degree=4",
                                    f"train.resume={ckpt(zero2, RESUME)}")}


# the runs join the trainer's msrun jobs of 2 and 4 workers (tests/integration/trainer_runs.py)
add_runs(2, ("ep2_zero1_from_ep1",), _runs2)
add_runs(4, ("dp4_ep2_zero2", "ep4_from_ep2"), _runs4)


@pytest.fixture(scope="module")
def runs(trainer_jobs, one_process):
    """{name: run dir}: the one-process references and the msrun runs (2 and 4 workers)."""
    out = {name: one_process(overrides)[1] for name, overrides in references(trainer_jobs).items()}
    for name in ("ep2_zero1_from_ep1", "dp4_ep2_zero2", "ep4_from_ep2"):
        out[name] = trainer_jobs.run_dir(name)
    # EP -> one process: the 4-worker ZeRO-2 run's step-3 checkpoint (experts and their moments gathered)
    out["ep1_from_zero2"] = one_process([*RECIPE, trainer_jobs.cache, "train.grad_accum_steps=4",
                                         f"train.resume={ckpt(out['dp4_ep2_zero2'], RESUME)}"])[1]
    return out


def test_expert_parallel_trains_like_one_process(runs):
    """EP from step 1: dp4 x ep2 with ZeRO-2 on 4 workers (the 2-worker dp2 x ep2 run resumes from one process
    below; ep4 on 4 workers resumes from this run)."""
    assert_same_run(runs["dp4_ep2_zero2"], runs["ref4"], range(1, STEPS + 1))
    aux = [a for _, a in losses(runs["dp4_ep2_zero2"]).values()]
    assert all(0.015 < a < 0.03 for a in aux), aux  # 0.01 x E sum_e f_e P_e: 0.01 x k = 0.02 when balanced


def test_resume_across_expert_parallel_layouts(runs):
    """ep2 (dp4 x ep2, ZeRO-2) -> ep4 without ZeRO; one process -> ep2 and ep2 -> one process are in the ZeRO test
    below (the same resumes, with the optimizer state sliced and gathered as well)."""
    tail = range(RESUME + 1, STEPS + 1)
    assert_same_run(runs["ep4_from_ep2"], runs["ref4"], tail)


def test_expert_parallel_with_zero_trains_and_resumes_like_one_process(runs):
    """ZeRO under EP (parallel/zero.py expert_groups): dp4 x ep2 with ZeRO-2 from step 1 (above); the optimizer
    state is layout-free both ways (one process -> ep2 with ZeRO-1, ZeRO-2's step-3 checkpoint -> one process): the
    resumed steps equal the uninterrupted one-process run only if the AdamW moments moved intact."""
    tail = range(RESUME + 1, STEPS + 1)
    assert_same_run(runs["ep2_zero1_from_ep1"], runs["ref2"], tail)
    assert_same_run(runs["ep1_from_zero2"], runs["ref4"], tail)


PEER_PYTHON = Path(os.environ.get("ASCEND_LLM_PEER_PYTHON", "/work/peer-venv/bin/python"))
PEER_SCRIPT = r'''
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
out = {}
for case in json.load(open(sys.argv[1])):
    model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():
        logits = model(torch.tensor([case["ids"]])).logits[0].double().numpy()
    diff = float(np.abs(logits - np.load(case["expected"])).max())
    out[case["name"]] = {"class": type(model).__name__, "max_abs": diff}
print(json.dumps(out))
'''


def test_exports_load_in_transformers_with_the_same_logits(runs, tmp_path):
    """Both fixtures in both expert layouts, and the checkpoint the 2-worker EP run (dp2 x ep2 with ZeRO-1) wrote
    (`convert --to hf`):
    transformers (the peer venv) loads each export and computes the toolkit's logits."""
    import subprocess

    from mindspore import Tensor

    from ascend_llm.cli.main import main as cli_main
    from ascend_llm.interop.export import export_hf
    from ascend_llm.interop.source import open_model

    if not PEER_PYTHON.is_file():
        pytest.skip(f"no peer python at {PEER_PYTHON} (a venv with torch + transformers)")
    fixtures = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "hf"
    ids = list(range(3, 40, 3))
    cases = []
    sources = {name: fixtures / name for name in ("qwen2_moe_tiny", "qwen3_moe_tiny") if (fixtures / name).is_dir()}
    assert cli_main(["convert", str(ckpt(runs["ep2_zero1_from_ep1"], STEPS)), "--to", "hf", "--output",
                     str(tmp_path / "ep2"), "--dtype", "fp32"]) == 0
    sources["ep2_trained"] = tmp_path / "ep2"
    for name, path in sources.items():
        source = open_model(path)
        expected = tmp_path / f"{name}.npy"
        np.save(expected, source.model(Tensor(np.array([ids], np.int32))).asnumpy()[0].astype(np.float64))
        layouts = ("per_expert", "fused") if name != "ep2_trained" else ("per_expert",)
        for layout in layouts:
            out = path if name == "ep2_trained" else export_hf(tmp_path / f"{name}_{layout}", source.config,
                                                                source.weights, "fp32", text_files=source.text_files,
                                                                expert_layout=layout)
            cases.append({"name": f"{name}:{layout}", "dir": str(out), "ids": ids, "expected": str(expected)})
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    script = tmp_path / "peer.py"
    script.write_text(PEER_SCRIPT)
    done = subprocess.run([str(PEER_PYTHON), str(script), str(spec)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases) >= 1
    for name, result in results.items():
        assert result["class"] in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"), result
        assert result["max_abs"] < 1e-4, (name, result)
