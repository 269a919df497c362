"""End to end through the CLI on a debug-size checkpoint: quantize (RTN, GPTQ + HF GPTQ export), save/load round
trip, eval table; the HF GPTQ tensors are decoded with the AutoGPTQ formula written here."""

from __future__ import annotations

import dataclasses
import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from safetensors.numpy import load_file

from ascend_llm.cli.main import main
from ascend_llm.config.model import ModelConfig
from ascend_llm.models.llama import build_model
from ascend_llm.tokenizer.bpe import train_tokenizer
from ascend_llm.train.checkpoint import save_model_checkpoint

# the later tests read what test_quantize_eval_and_export writes into the module fixture's folder: one xdist worker,
# in file order (the fixture is per worker)
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("quant_cli")]
WORDS = ["春", "風", "花", "月", "山", "水", "雲", "夜", "江", "柳", "秋", "雨", "人", "歸", "酒", "明"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qcli")
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(WORDS, size=rng.integers(20, 40))) for _ in range(80)]
    corpus = root / "poems.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n")
    data = root / "prepared"
    data.mkdir()
    train_tokenizer(docs, 300).save(str(data / "tokenizer.json"))
    cfg = ModelConfig(vocab_size=320, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=96,
                      max_seq_len=64)
    model = build_model(cfg, seed=3)
    run = root / "run"
    save_model_checkpoint(run, 5, {n: p.asnumpy() for n, p in model.parameters_and_names()},
                          {"model": dataclasses.asdict(cfg)}, tokenizer=data / "tokenizer.json")
    return root, corpus, run


def test_quantize_eval_and_export(setup, capsys):
    root, corpus, run = setup
    assert main(["quantize", str(run), "--out", str(root / "q_rtn"), "--bits", "4", "--group-size", "32"]) == 0
    assert main(["quantize", str(run), "--out", str(root / "q_gptq"), "--method", "gptq", "--bits", "4",
                 "--group-size", "32", "--calib-corpus", str(corpus), "--calib-docs", "0:40",
                 "--num-calib-samples", "8", "--calib-seq-len", "32", "--hf-gptq", str(root / "hf_gptq")]) == 0
    try:
        assert main(["eval", str(run), str(root / "q_rtn"), str(root / "q_gptq"), "--corpus", str(corpus),
                     "--docs=-20:", "--window", "32", "--stride", "16", "--json", str(root / "eval.json"),
                     "--pynative"]) == 0
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    out = capsys.readouterr().out
    table = out.splitlines()[-5:]
    assert table[0].startswith("| model | kind | bytes on disk") and len(table) == 5  # header, rule, 3 rows
    rows = json.loads((root / "eval.json").read_text())
    assert [r["kind"] for r in rows] == ["checkpoint", "quantized", "quantized"]
    assert rows[0]["ppl_change_pct"] == 0.0 and all(r["window"] == 32 and r["stride"] == 16 for r in rows)
    assert rows[1]["bytes_on_disk"] < rows[0]["bytes_on_disk"]
    assert rows[1]["linear_fp32_bytes"] / rows[1]["linear_bytes"] > 7  # int4 g32: 0.5 + 2/32 bytes per weight
    assert (root / "q_rtn" / "tokenizer.json").is_file()
    section = json.loads((root / "q_gptq" / "config.json").read_text())["quantization"]
    assert section["method"] == "gptq" and section["bits"] == 4 and len(section["layers"]) == 14


def test_saved_quantized_model_reloads_identically(setup):
    from ascend_llm.config.quant import QuantConfig
    from ascend_llm.interop.quantized import load_quantized, save_quantized
    from ascend_llm.interop.source import open_model
    from ascend_llm.quant.apply import apply_quantization

    root, _, run = setup
    source = open_model(run)
    apply_quantization(source.model, QuantConfig(bits=4, group_size=16, sym=False))
    save_quantized(source.model, source.config, QuantConfig(bits=4, group_size=16, sym=False),
                   [p for p, _ in source.model.cells_and_names() if p.endswith(("wq", "wk", "wv", "wo", "w1",
                                                                                 "w2", "w3"))], root / "q_asym")
    model, _, _ = load_quantized(root / "q_asym")
    tokens = Tensor(np.arange(24, dtype=np.int32).reshape(2, 12))
    np.testing.assert_array_equal(model(tokens).asnumpy(), source.model(tokens).asnumpy())


def hf_gptq_dequant(t, bits, v1):
    """AutoGPTQ's torch dequantization, in NumPy: unpack qweight along rows and qzeros along columns."""
    per = 32 // bits
    qweight, qzeros = t["qweight"].view(np.uint32), t["qzeros"].view(np.uint32)
    shifts = np.arange(per, dtype=np.uint32) * bits
    w = ((qweight[:, None, :] >> shifts[None, :, None]) & (2 ** bits - 1)).reshape(-1, qweight.shape[1])
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & (2 ** bits - 1)).reshape(qzeros.shape[0], -1)
    z = z.astype(np.int64) + (1 if v1 else 0)
    g = t["g_idx"]
    return (t["scales"].astype(np.float64)[g] * (w.astype(np.int64) - z[g])).T  # (out, in)


def test_hf_gptq_layout_decodes_to_our_weights(setup):
    from ascend_llm.interop.quantized import load_quantized
    from ascend_llm.quant.rtn import dequantize

    root, _, _ = setup
    tensors = load_file(str(root / "hf_gptq" / "model.safetensors"))
    config = json.loads((root / "hf_gptq" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == {**qc, "quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                  "checkpoint_format": "gptq"}
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors
    prefix = "model.layers.1.mlp.down_proj"
    layer = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert layer["qweight"].shape == (96 // 8, 64) and layer["qweight"].dtype == np.int32
    assert layer["qzeros"].shape == (3, 64 // 8) and layer["scales"].shape == (3, 64)
    ours = json.loads((root / "q_gptq" / "config.json").read_text())["quantization"]
    from ascend_llm.interop.quantized import read_quantized_weight

    saved = load_file(str(root / "q_gptq" / "model.safetensors"))
    qw = read_quantized_weight(saved, "layers.1.feed_forward.w2", ours, 64, 96)
    np.testing.assert_array_equal(hf_gptq_dequant(layer, 4, v1=True), dequantize(qw).astype(np.float64))
    load_quantized(root / "q_gptq")  # our layout loads


def test_bad_model_path_is_one_line_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--corpus", str(tmp_path / "c.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model=" in err
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path / "o"), "--bits", "3"]) == 2
    assert "quant.bits=3" in capsys.readouterr().err
