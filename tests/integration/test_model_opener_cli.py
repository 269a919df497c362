"""Every verb opens models the same way (case 05 and its kind): `eval` and GPTQ `quantize` on Hugging Face
directories whose tokenizer has no `<|endoftext|>`, quantized copies that keep the source's text files, and a
checkpoint with flipped bytes refused by `convert` and `generate` as by the others (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("model_opener_cli")]  # fixtures start once

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)
POEMS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
         "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "红豆生南国，春来发几枝。愿君多采撷，此物最相思。"] * 6


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOG_v": "3", "ASCEND_LLM_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "ascend_llm.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    path = tmp_path_factory.mktemp("corpus") / "poems.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in POEMS), encoding="utf-8")
    return path


def test_eval_reads_a_hugging_face_directory_and_matches_a_numpy_perplexity(corpus, tmp_path):
    """Perplexity of one window equals exp(mean NLL) computed from the model's own logits in float64."""
    model = FIXTURES / "qwen3_qknorm"
    out = cli("eval", str(model), "--corpus", str(corpus), "--docs", "0:1", "--window", "64", "--stride", "63",
              "--json", str(tmp_path / "rows.json"), "--pynative", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads((tmp_path / "rows.json").read_text())[0]
    assert row["kind"] == "hf" and np.isfinite(row["perplexity"])

    import mindspore as ms

    from ascend_llm.interop.source import open_model

    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        source = open_model(model)
        eos = source.eos_token_ids[0]
        ids = []
        for text in POEMS[:1]:
            ids += source.tokenizer.encode(text) + [eos]
        assert row["num_tokens"] == len(ids) - 1 and len(ids) <= 64  # one window holds the whole stream
        logits = source.model(ms.Tensor(np.array([ids], np.int32))).asnumpy()[0].astype(np.float64)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)  # the session's mode for the tests that follow on this worker
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert row["perplexity"] == pytest.approx(np.exp(nll), rel=1e-4)


def test_gptq_on_a_llama_directory_calibrates_with_its_own_eos_and_keeps_its_text_files(corpus, tmp_path):
    src = FIXTURES / "llama_gqa"
    out = cli("quantize", str(src), "--out", "q", "--bits", "4", "--method", "gptq", "--calib-corpus", str(corpus),
              "--calib-docs", "0:20", "--num-calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "q" / name).read_bytes() == (src / name).read_bytes(), name


def _flipped_checkpoint(tmp_path: Path) -> Path:
    import dataclasses

    from ascend_llm.config.model import ModelConfig
    from ascend_llm.models.llama import build_model
    from ascend_llm.train.checkpoint import save_model_checkpoint

    cfg = ModelConfig(dim=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_dim=48, vocab_size=700,
                      max_seq_len=64)
    weights = {p.name: p.asnumpy() for p in build_model(cfg).get_parameters()}
    step = save_model_checkpoint(tmp_path / "run", 1, weights, {"model": dataclasses.asdict(cfg)},
                                 FIXTURES / "llama_gqa" / "tokenizer.json")
    data = bytearray((step / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (step / "model.safetensors").write_bytes(bytes(data))
    return step


def test_convert_and_generate_refuse_a_checkpoint_with_flipped_bytes(tmp_path):
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    step = _flipped_checkpoint(tmp_path)
    for args in (("convert", str(step), "--to", "hf", "--output", "out"),
                 ("generate", str(step), "--prompt", "床前", "--max-new-tokens", "2")):
        out = cli(*args, cwd=tmp_path)
        assert out.returncode == 2, (args[0], out.stdout[-500:], out.stderr[-1500:])
        assert "sha256 mismatch" in out.stderr and "Traceback" not in out.stderr
        assert len([line for line in out.stderr.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "out").exists()
