"""Export to Hugging Face: every fixture re-exported is bit-identical with the Hugging Face layout (names,
shapes, dtypes, tensor bytes) and carries the source's text files byte for byte (tokenizer, chat template,
generation config with an EOS list, special tokens map); config.json says what the source's says for every
family (Llama 3.1 RoPE scaling, Qwen2 bias, Qwen3 q/k norm and head_dim, tied embeddings); a toolkit checkpoint
converts through the CLI and imports back exactly; bf16 rounding equals ml_dtypes'. transformers loading the
exports: tests/integration/test_export_transformers.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import mindspore as ms
import ml_dtypes
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.cli.main import main as cli_main
from ascend_llm.config.model import ModelConfig
from ascend_llm.interop.export import export_hf, model_weights
from ascend_llm.interop.safetensors_io import bf16_bits
from ascend_llm.interop.source import open_model
from ascend_llm.models.llama import build_model
from ascend_llm.tokenizer.hf import HFTokenizer
from ascend_llm.train.checkpoint import save_model_checkpoint

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)
NAMES = ["llama_gqa", "qwen2_tied", "qwen3_qknorm", "llama_bf16", "llama31"]
TEXT = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
        "special_tokens_map.json")
# config.json keys that decide what a loader computes, compared with the source's (absent keys as their defaults)
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
             "max_position_embeddings", "bos_token_id", "eos_token_id")


def fixture(name: str) -> Path:
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    return FIXTURES / name


def make_llama31(dst: Path) -> Path:
    """llama_gqa with Llama 3.1 RoPE scaling written the transformers-4.x way (rope_theta + rope_scaling), as
    cases/04-hf-gptq-export-wrong-architecture/make_llama31.py does, plus a Llama 3 style EOS list and a
    special_tokens_map.json."""
    shutil.copytree(fixture("llama_gqa"), dst)
    config = json.loads((dst / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 10000.0
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}
    config["eos_token_id"] = [636, 639]  # Llama 3.1: <|end_of_text|> and <|eot_id|>
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    gen = json.loads((dst / "generation_config.json").read_text())
    gen.update(eos_token_id=[636, 639], temperature=0.6, top_p=0.9)
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    special = {k: tok[k] for k in ("bos_token", "eos_token") if tok.get(k)}
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return dst


def source_dir(name: str, tmp_path: Path) -> Path:
    return make_llama31(tmp_path / "llama31") if name == "llama31" else fixture(name)


def assert_config_matches_source(out: Path, src: Path, quantized: bool = False) -> None:
    """config.json of an export against the source's: the architecture keys, head_dim, q/k/v bias, RoPE (theta and
    llama3 scaling, in either key style) and the dtype."""
    written = json.loads((out / "config.json").read_text())
    original = json.loads((src / "config.json").read_text())
    for key in ARCH_KEYS:
        assert written.get(key) == original.get(key), key
    heads = original["num_attention_heads"]
    assert written["head_dim"] == (original.get("head_dim") or original["hidden_size"] // heads)
    family = original["model_type"]
    assert written.get("attention_bias", family == "qwen2") == original.get("attention_bias", family == "qwen2")
    rope = original.get("rope_parameters") or {"rope_theta": original.get("rope_theta", 10000.0),
                                               **(original.get("rope_scaling") or {"rope_type": "default"})}
    assert written["rope_parameters"] == rope and written["rope_theta"] == rope["rope_theta"]
    if rope["rope_type"] == "llama3":  # what transformers 4.x reads
        assert written["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        assert "rope_scaling" not in written
    assert ("quantization_config" in written) == quantized


def assert_text_files_copied(out: Path, src: Path) -> None:
    """Every text file of the source, byte for byte (generation_config.json with its EOS list included)."""
    for name in TEXT:
        assert (out / name).is_file() == (src / name).is_file(), name
        if (src / name).is_file():
            assert (out / name).read_bytes() == (src / name).read_bytes(), name


@pytest.fixture(scope="module", autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


def raw_tensors(root: Path) -> dict[str, tuple[str, list, bytes]]:
    """{name: (dtype, shape, bytes)} over all safetensors files, parsed here from the spec (no project code)."""
    out = {}
    for file in sorted(root.glob("*.safetensors")):
        data = file.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        assert header.pop("__metadata__", {}).get("format") in (None, "pt")
        for name, spec in header.items():
            begin, end = spec["data_offsets"]
            out[name] = (spec["dtype"], spec["shape"], data[8 + size + begin:8 + size + end])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_reexport_is_bit_identical_in_the_hf_layout(tmp_path, name):
    src = source_dir(name, tmp_path)
    opened = open_model(src, build=False)
    dtype = "bf16" if name == "llama_bf16" else "fp32"
    out = export_hf(tmp_path / "out", opened.config, opened.weights, dtype=dtype, text_files=opened.text_files,
                    eos_token_ids=opened.eos_token_ids, max_shard_bytes=150_000)
    assert raw_tensors(out) == raw_tensors(src)  # names, dtypes, shapes and every byte
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(raw_tensors(src))
    assert all((out / f).is_file() for f in index["weight_map"].values()) and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(len(b) for _, _, b in raw_tensors(src).values())
    cfg2 = open_model(out, weights=False).config
    assert dataclasses.replace(cfg2, name=opened.config.name) == opened.config
    meta = json.loads(fixture(f"{'llama_gqa' if name == 'llama31' else name}.golden.json").read_text())
    tokenizer = HFTokenizer(out)
    assert tokenizer.encode(meta["text"]) == meta["text_input_ids"]
    assert tokenizer.apply_chat_template(meta["chat_messages"]) == meta["chat_input_ids"]
    assert open_model(out, build=False).eos_token_ids == opened.eos_token_ids
    assert_text_files_copied(out, src)
    assert_config_matches_source(out, src)


def test_convert_cli_keeps_text_files_eos_list_and_chat_template_override(tmp_path, capsys):
    src = make_llama31(tmp_path / "llama31")
    assert cli_main(["convert", str(src), "--to", "hf", "--output", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert_text_files_copied(tmp_path / "out", src)
    assert_config_matches_source(tmp_path / "out", src)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", encoding="utf-8")
    assert cli_main(["convert", str(src), "--to", "hf", "--output", str(tmp_path / "t"), "--dtype", "fp32",
                     "--chat-template", str(template)]) == 0
    assert (tmp_path / "t" / "chat_template.jinja").read_bytes() == template.read_bytes()
    assert HFTokenizer(tmp_path / "t").render_chat([{"role": "user", "content": "x"}]) == "<user>x"
    assert cli_main(["convert", str(src), "--to", "hf", "--output", str(tmp_path / "out"), "--dtype", "fp32"]) == 2
    assert "--output=" in capsys.readouterr().err


def test_bf16_rounding_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.3895314e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8]
    x = np.concatenate([rng.normal(size=20000) * 10.0 ** rng.integers(-40, 38, size=20000), edges])
    x = x.astype(np.float32)
    np.testing.assert_array_equal(bf16_bits(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.isnan(bf16_bits(np.array([np.nan], np.float32)).view(ml_dtypes.bfloat16).astype(np.float32))[0]


def _toolkit_run(tmp_path: Path) -> tuple[Path, object, ModelConfig]:
    """A toolkit run directory with one checkpoint of a Qwen3-shaped debug model and a prepared tokenizer."""
    cfg = ModelConfig(name="debug", vocab_size=560, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_dim=96, max_seq_len=128, head_dim_override=24, qk_norm=True, tie_embeddings=True)
    model = build_model(cfg, seed=5)
    rng = np.random.default_rng(1)
    for p in model.get_parameters():
        if "norm" in p.name:
            p.set_data(Tensor(rng.normal(1.0, 0.2, p.shape).astype(np.float32)))
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    shutil.copy(fixture("qwen3_qknorm") / "tokenizer.json", prepared / "tokenizer.json")
    (prepared / "meta.json").write_text(json.dumps({"eos_id": 557}))  # "<|endoftext|>", the toolkit's EOS
    save_model_checkpoint(tmp_path / "run", 7, model_weights(model), {"model": dataclasses.asdict(cfg)},
                          tokenizer=prepared / "tokenizer.json")
    return tmp_path / "run", model, cfg


def test_toolkit_checkpoint_converts_through_the_cli_and_imports_back(tmp_path, capsys):
    run, model, cfg = _toolkit_run(tmp_path)
    weights = model_weights(model)
    assert cli_main(["convert", str(run), "--to", "hf", "--output", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert cli_main(["convert", str(run / "checkpoints" / "step_00000007"), "--to", "hf",
                     "--output", str(tmp_path / "bf16")]) == 0
    files = raw_tensors(tmp_path / "fp32")
    assert "lm_head.weight" not in files and files["model.layers.1.self_attn.k_norm.weight"][:2] == ("F32", [24])
    assert files["model.layers.0.self_attn.q_proj.weight"][1] == [4 * 24, 64]
    fp32 = open_model(tmp_path / "fp32")
    back, cfg_back, tokenizer = fp32.model, fp32.config, fp32.tokenizer
    assert dataclasses.replace(cfg_back, name=cfg.name) == cfg
    for name, value in model_weights(back).items():
        np.testing.assert_array_equal(value, weights[name])
    ids = Tensor(np.random.default_rng(2).integers(0, 559, size=(2, 16)).astype(np.int32))
    np.testing.assert_array_equal(back(ids).asnumpy(), model(ids).asnumpy())
    assert tokenizer.eos_token_id == 557 and fp32.eos_token_ids == [557]
    bf16_weights = open_model(tmp_path / "bf16", build=False).weights
    for name, value in bf16_weights.items():
        np.testing.assert_array_equal(value, weights[name].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli_main(["convert", str(run), "--to", "hf", "--output", str(tmp_path / "fp32")]) == 2
    assert "--output=" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "fp32", "prepared", "run"]  # no temp left


def test_convert_of_a_quantized_directory_is_one_line_exit_2(tmp_path, capsys):
    assert cli_main(["quantize", str(fixture("qwen2_tied")), "--out", str(tmp_path / "q"), "--bits", "8"]) == 0
    capsys.readouterr()
    assert cli_main(["convert", str(tmp_path / "q"), "--to", "hf", "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--hf-gptq" in err and not (tmp_path / "hf").exists()
