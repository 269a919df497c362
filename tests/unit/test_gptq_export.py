"""The Hugging Face GPTQ layout for every family the importer reads (Llama 3.1 with rope_scaling, Qwen2 tied with
q/k/v bias, Qwen3 with q/k norm and head_dim, Llama GQA untied): qweight/qzeros/scales/g_idx decoded with the
AutoGPTQ formula written here (not quant/pack.py) equal the toolkit's own dequantization; every other tensor is
the source's in float16 under the source's name; config.json says what the source's says; the text files (chat
template, EOS list) are copied. `quantize` keeps them in our layout too (case 06), exports Qwen3 (case 04) and
writes nothing when the GPTQ layout cannot be made. transformers on these exports:
tests/integration/test_export_transformers.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from ascend_llm.cli.main import main as cli_main
from ascend_llm.config.model import ModelConfig
from ascend_llm.config.quant import QuantConfig
from ascend_llm.interop.quantized import export_hf_gptq
from ascend_llm.interop.source import open_model
from ascend_llm.models.llama import build_model
from ascend_llm.quant.apply import apply_quantization
from ascend_llm.quant.rtn import dequantize
from ascend_llm.train.checkpoint import save_model_checkpoint
from tests.unit.test_hf_export import (
    TEXT,
    assert_config_matches_source,
    assert_text_files_copied,
    fixture,
    source_dir,
)

FAMILIES = ["llama31", "qwen2_tied", "qwen3_qknorm", "llama_gqa"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


def autogptq_dequant(tensors: dict[str, np.ndarray], prefix: str, bits: int, checkpoint_format: str) -> np.ndarray:
    """(out, in) float64 weight of one GPTQ layer, AutoGPTQ's dequantization (qlinear torch kernels) in NumPy:
    qweight (in * bits / 32, out) int32 unpacked along rows, qzeros (G, out * bits / 32) along columns, code j of a
    word at bits [bits*j, bits*(j+1)); "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself;
    W[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])."""
    mask = (1 << bits) - 1
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    qweight = tensors[f"{prefix}.qweight"].view(np.uint32)
    qzeros = tensors[f"{prefix}.qzeros"].view(np.uint32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1]).astype(np.int64)
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1).astype(np.int64)
    if checkpoint_format == "gptq":
        z = z + 1
    g = tensors[f"{prefix}.g_idx"].astype(np.int64)
    scales = tensors[f"{prefix}.scales"].astype(np.float64)
    return (scales[g] * (q - z[g])).T


def source_tensors(src: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(src.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def check_gptq_export(out: Path, src: Path, qweights: dict, qcfg: QuantConfig) -> None:
    """Decode every quantized layer and compare with the toolkit's dequantization; every other tensor of the
    source is there in float16; config.json, quantize_config.json and the text files."""
    fmt = "gptq" if qcfg.sym else "gptq_v2"
    tensors = load_file(str(out / "model.safetensors"))
    original = source_tensors(src)
    heads = ("lm_head.weight",) if qcfg.include_output else ()
    quantized = {k[: -len(".weight")] for k in original if k.endswith(tuple(f"{n}.weight" for n in LINEARS) + heads)}
    expected = {k for k in original if k[: -len(".weight")] not in quantized}
    expected |= {f"{p}.{s}" for p in quantized for s in ("qweight", "qzeros", "scales", "g_idx")}
    assert set(tensors) == expected  # q/k/v bias (Qwen2) and q_norm/k_norm (Qwen3) included; no lm_head if tied
    for name in expected & set(original):
        assert tensors[name].dtype == np.float16
        np.testing.assert_array_equal(tensors[name], original[name].astype(np.float16))
    assert len(qweights) == len(quantized)
    for path, qw in qweights.items():
        prefix = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                  "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj",
                  "output": "lm_head"}[path.rsplit(".", 1)[-1]]
        prefix = prefix if path == "output" else f"model.layers.{path.split('.')[1]}.{prefix}"
        assert tensors[f"{prefix}.qweight"].dtype == np.int32 and tensors[f"{prefix}.scales"].dtype == np.float16
        np.testing.assert_array_equal(autogptq_dequant(tensors, prefix, qcfg.bits, fmt),
                                      dequantize(qw).astype(np.float64))
    assert_config_matches_source(out, src, quantized=True)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    keys = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "lm_head")
    assert {k: qc[k] for k in keys} == {
        "quant_method": "gptq", "bits": qcfg.bits, "group_size": qcfg.group_size, "sym": qcfg.sym,
        "desc_act": qcfg.act_order, "checkpoint_format": fmt, "lm_head": "lm_head" in quantized}
    assert config["dtype"] == config["torch_dtype"] == "float16"
    assert_text_files_copied(out, src)


GRIDS = {"int4-g16-sym": QuantConfig(bits=4, group_size=16, sym=True),
         "int4-g32-asym": QuantConfig(bits=4, group_size=32, sym=False),
         "int8-channel-sym": QuantConfig(bits=8, group_size=-1, sym=True),
         "int4-g32-sym-head": QuantConfig(bits=4, group_size=32, sym=True, include_output=True)}
CASES = [(f, "int4-g16-sym") for f in FAMILIES] + [
    ("qwen3_qknorm", "int4-g32-asym"), ("qwen2_tied", "int8-channel-sym"), ("llama_gqa", "int4-g32-sym-head")]


@pytest.mark.parametrize(("name", "grid"), CASES)
def test_gptq_layout_decodes_to_our_weights_with_the_source_config(tmp_path, name, grid):
    src = source_dir(name, tmp_path)
    opened = open_model(src)
    qweights = apply_quantization(opened.model, GRIDS[grid])
    out = export_hf_gptq(opened.model, opened.config, GRIDS[grid], qweights, tmp_path / "gptq", opened.text_files,
                         eos_token_ids=opened.eos_token_ids)
    check_gptq_export(out, src, qweights, GRIDS[grid])


def test_act_order_gptq_keeps_its_group_index(tmp_path):
    src = fixture("llama_gqa")
    opened = open_model(src)
    qcfg = QuantConfig(bits=4, group_size=16, sym=True, method="gptq", act_order=True)
    calibration = np.random.default_rng(0).integers(0, opened.config.vocab_size, size=(4, 32)).astype(np.int32)
    qweights = apply_quantization(opened.model, qcfg, calibration)
    assert any(not np.array_equal(qw.g_idx, np.sort(qw.g_idx)) for qw in qweights.values())  # really permuted
    out = export_hf_gptq(opened.model, opened.config, qcfg, qweights, tmp_path / "gptq", opened.text_files)
    check_gptq_export(out, src, qweights, qcfg)


def test_quantize_cli_keeps_text_files_in_both_layouts(tmp_path):
    """Case 06 (a quantized copy of an HF model keeps its chat template and EOS list) and case 04 (a): Qwen3 and
    Llama 3.1 through `quantize --hf-gptq`."""
    for name in ("qwen3_qknorm", "llama31"):
        src = source_dir(name, tmp_path)
        ours, hf_dir = tmp_path / f"q_{name}", tmp_path / f"hf_{name}"
        assert cli_main(["quantize", str(src), "--out", str(ours), "--bits", "4", "--group-size", "32",
                         "--hf-gptq", str(hf_dir)]) == 0
        assert_text_files_copied(ours, src)
        assert_config_matches_source(hf_dir, src, quantized=True)
        assert_text_files_copied(hf_dir, src)
        before, after = open_model(src, build=False), open_model(ours, build=False)
        assert after.kind == "quantized" and after.eos_token_ids == before.eos_token_ids
        assert after.tokenizer.chat_template == before.tokenizer.chat_template is not None
        assert after.config.rope_scaling_type == before.config.rope_scaling_type
    assert open_model(tmp_path / "q_llama31", build=False).eos_token_ids == [636, 639]


def _toolkit_run(tmp_path: Path, ffn_hidden_dim: int) -> Path:
    cfg = ModelConfig(name="debug", vocab_size=560, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_dim=ffn_hidden_dim, max_seq_len=64)
    model = build_model(cfg, seed=5)
    prepared = tmp_path / "prepared"
    prepared.mkdir(exist_ok=True)
    (prepared / "tokenizer.json").write_bytes((fixture("qwen3_qknorm") / "tokenizer.json").read_bytes())
    run = tmp_path / f"run{ffn_hidden_dim}"
    save_model_checkpoint(run, 3, {n: p.asnumpy() for n, p in model.parameters_and_names()},
                          {"model": dataclasses.asdict(cfg)}, tokenizer=prepared / "tokenizer.json")
    return run


def test_quantize_writes_nothing_when_the_gptq_layout_cannot_be_made(tmp_path, capsys):
    run = _toolkit_run(tmp_path, ffn_hidden_dim=100)  # down_proj in_features 100: not 8 int4 codes per int32
    code = cli_main(["quantize", str(run), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size", "-1",
                     "--hf-gptq", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--hf-gptq:layers.0.feed_forward.w1.out_features=100" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "run100"]  # no temporaries either
    # a toolkit-trained model exports with its own EOS (<|endoftext|>) named in the text files
    run = _toolkit_run(tmp_path, ffn_hidden_dim=96)
    assert cli_main(["quantize", str(run), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size", "32",
                     "--hf-gptq", str(tmp_path / "hf")]) == 0
    eos = open_model(run, build=False).eos_token_ids
    assert eos and open_model(tmp_path / "q", build=False).eos_token_ids == eos
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eos[0]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == eos[0]
    written = {p.name for p in (tmp_path / "hf").iterdir()}
    assert set(TEXT) - {"chat_template.jinja", "special_tokens_map.json"} <= written
