"""Preference tuning's work in the planner and in the trainer's throughput/MFU: a pair is two sequences (chosen and
rejected rows of one forward), and DPO with the adapters-off reference runs one more forward per step (no
activations kept). Expected numbers are written out from the formulas (PaLM appendix B: 6N + 12*L*h*s training
FLOPs per token, a forward being a third of it; the per-layer activation ledger of parallel/plan_activations.py
for naive attention in float32), not read from the planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.parallel.plan import plan_recipe

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), Path("shared/fixtures/hf"))
QWEN2 = FIXTURES / "qwen2_tied"
# model=debug: vocab 512, dim 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), SwiGLU 176, untied, float32.
BASE = ["model=debug", "data.seq_len=64", "train.global_batch_size=8", "train.grad_accum_steps=2",
        "attention=naive", "runtime.cpu_peak_tflops=1"]
LAYER = 64 * 16 * (4 + 2 * 2) + 4 * 16 * 64 + 3 * 64 * 176 + 2 * 64  # projections + 2 norms: 46208
N = 2 * LAYER + 64 + 512 * 64  # matmul weights: layers, final norm, output head (no input embedding)
ATTENTION = 12 * 2 * 64 * 64  # 12 * L * h * s
# one layer's kept tensors per token, naive attention, float32: norm inputs and outputs, q/k/v, wo input, SwiGLU
PER_TOKEN_LAYER = 2 * 4 * 64 + 2 * 4 * 64 + 4 * (64 + 2 * 32) + 4 * 64 + 4 * 4 * 176


def _plan(*extra: str):
    planned = plan_recipe(compose_recipe([*BASE, *extra]))
    return planned, {t.name: t.bytes for t in planned.memory.terms}


@pytest.mark.parametrize("objective,reference", [("lm", False), ("simpo", False), ("dpo", False),
                                                 ("dpo_lora", True)])
def test_planner_counts_both_sequences_and_the_reference_forward(objective, reference):
    extra = {"lm": [], "simpo": ["objective=simpo"], "dpo": ["objective=dpo"],  # dpo: the cached reference
             "dpo_lora": ["objective=dpo", "lora.enabled=true"]}[objective]
    planned, terms = _plan(*extra)
    rows = 1 if objective == "lm" else 2
    tokens = 8 // 2 * 64 * rows  # one micro-batch: 4 data rows of 64 tokens, each pair 2 sequences
    assert planned.layout.micro_batch == 4 * rows
    assert terms["activations: 2 layers (naive attention)"] == 2 * PER_TOKEN_LAYER * tokens
    assert terms["logits and their gradient (fp32)"] == 2 * 4 * 512 * tokens
    flops = 6 * N + ATTENTION + (2 * N + ATTENTION / 3 if reference else 0)  # + one forward: 2N + 4*L*h*s
    assert planned.time.model_flops_per_token == pytest.approx(flops, rel=1e-12)
    assert planned.time.tokens_per_step == 8 * 64 * rows
    assert planned.time.compute_s == pytest.approx(8 * 64 * rows * flops / 1e12, rel=1e-12)
    if reference:  # one layer's working set and the reference's float32 logits and log-softmax
        assert terms["reference forward (adapters off, nothing kept)"] == (PER_TOKEN_LAYER + 2 * 4 * 512) * tokens
    else:
        assert "reference forward (adapters off, nothing kept)" not in terms


def test_planner_counts_the_reference_forwards_collectives():
    """Tensor parallel: 4 activation all-reduces per layer for a forward + backward, 2 more for the reference's
    forward; context parallel: K/V all-gathered forward and reduce-scattered backward, one more gather."""
    par = ["cluster.intra_node_gb_per_s=100", "cluster=cpu_2proc"]
    for parallel, name, ratio in (("parallel=tp2", "tensor parallel (activations)", 6 / 4),
                                  ("parallel=cp2", "context parallel (k, v)", 3 / 2)):
        cached = _plan(*par, parallel, "objective=dpo")[0].time.comm_s[name]
        live = _plan(*par, parallel, "objective=dpo", "lora.enabled=true")[0].time.comm_s[name]
        assert cached > 0 and live == pytest.approx(ratio * cached, rel=1e-12)


@pytest.mark.skipif(not QWEN2.is_dir(), reason="shared fixtures absent: ../shared/fixtures/hf")
@pytest.mark.parametrize("objective,reference", [("simpo", False), ("dpo_lora", True)])
def test_throughput_counts_both_sequences_of_a_pair(tmp_path, objective, reference):
    """tokens/s and MFU of a preference run: 2 * global_batch_size * seq_len tokens per step (they read half as
    much when a pair counted as one sequence) and, with the adapters-off reference, its forward in the FLOPs."""
    import json

    from ascend_llm.train.session import build_session

    data = tmp_path / "pairs.jsonl"
    pairs = [("春眠不覺曉", "處處聞啼鳥", "白日依山盡"), ("床前明月光", "疑是地上霜", "黃河入海流"),
             ("紅豆生南國", "春來發幾枝", "欲窮千里目")] * 2
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                            for p, c, r in pairs), encoding="utf-8")
    extra = ["objective=simpo"] if objective == "simpo" else ["objective=dpo", "lora.enabled=true", "lora.rank=4"]
    session = build_session(compose_recipe([
        f"model.pretrained={QWEN2}", f"data.path={data}", "data.seq_len=32", f"data.cache_dir={tmp_path / 'cache'}",
        "train.global_batch_size=2", "train.num_steps=1", f"train.output_dir={tmp_path / 'run'}",
        "train.progress=false", *extra]))
    assert session.throughput.tokens_per_step == 2 * 2 * 32
    # N: every weight of the model but LoRA's adapters (tied embeddings: the table is the output head)
    n = sum(p.size for p in session.model.get_parameters() if "lora_" not in p.name)
    attention = 12 * 2 * 64 * 32
    flops = 6 * n + attention + (2 * n + attention / 3 if reference else 0)
    assert session.throughput.flops_per_token == pytest.approx(flops, rel=1e-12)
