"""The one model opener (`interop.source.open_model`): Hugging Face, checkpoint, run and quantized directories
say the same about text (tokenizer, chat template, EOS list) and give the same weights as independent readers
(safetensors read directly, LoRA merged by the formula in float64); bad checkpoints are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from ascend_llm.errors import CheckpointError, InteropError
from ascend_llm.interop.source import open_model
from ascend_llm.train.checkpoint import save_model_checkpoint

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)


def fixture(name: str) -> Path:
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    return FIXTURES / name


@pytest.fixture(scope="module", autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)  # the session's mode for the tests that follow on this worker


def hf_tensors(root: Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory, read with safetensors directly, upcast to float64."""
    out = {}
    for file in sorted(root.glob("*.safetensors")):
        out.update({k: v.astype(np.float64) for k, v in load_file(str(file)).items()})
    return out


def test_hf_directory_gives_its_eos_list_template_and_golden_greedy_logits(tmp_path):
    src = tmp_path / "llama"
    shutil.copytree(fixture("llama_gqa"), src)
    gen = json.loads((src / "generation_config.json").read_text())
    gen["eos_token_id"] = [636, 639]  # Llama 3 style: <|end_of_text|> and <|eot_id|>
    (src / "generation_config.json").write_text(json.dumps(gen))
    opened = open_model(src)
    assert opened.kind == "hf" and opened.eos_token_ids == [636, 639]
    assert opened.tokenizer.chat_template == (src / "chat_template.jinja").read_text(encoding="utf-8")
    assert set(opened.text_files) >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                      "generation_config.json"}
    golden = json.loads((FIXTURES / "llama_gqa.golden.json").read_text())
    ids = golden["text_input_ids"]
    assert opened.tokenizer.encode(golden["text"]) == ids  # BOS from the tokenizer's post-processor
    logits = opened.model(ms.Tensor(np.array([ids], np.int32))).asnumpy()[0, -1]
    assert int(np.argmax(logits)) == golden["greedy_continuation_ids"][0]


def test_chat_template_that_writes_bos_gets_exactly_one():
    opened = open_model(fixture("llama_gqa"))
    golden = json.loads((FIXTURES / "llama_gqa.golden.json").read_text())
    ids = opened.tokenizer.apply_chat_template(golden["chat_messages"], add_generation_prompt=True)
    bos = opened.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1


def _toolkit_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["床前明月光 疑是地上霜"] * 20, trainers.BpeTrainer(vocab_size=300,
                                                                          special_tokens=["<|endoftext|>"]))
    tok.save(str(path))
    return path


def _toolkit_run(tmp_path: Path, vocab: int = 300):
    from ascend_llm.config.model import ModelConfig

    cfg = ModelConfig(dim=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_dim=48, vocab_size=vocab,
                      max_seq_len=64)
    from ascend_llm.models.llama import build_model

    weights = {p.name: p.asnumpy() for p in build_model(cfg).get_parameters()}
    import dataclasses

    run = tmp_path / "run"
    tok = _toolkit_tokenizer(tmp_path / "tokenizer.json")
    for step in (5, 10):
        save_model_checkpoint(run, step, {k: v + step for k, v in weights.items()},
                              {"model": dataclasses.asdict(cfg)}, tok)
    return run, weights


def test_run_directory_opens_its_newest_verified_checkpoint_and_toolkit_eos(tmp_path):
    run, weights = _toolkit_run(tmp_path)
    opened = open_model(run)
    assert opened.kind == "checkpoint" and opened.path.name == "step_00000010"
    np.testing.assert_array_equal(opened.weights["norm.weight"], weights["norm.weight"] + 10)
    eos = opened.tokenizer.tokenizer.token_to_id("<|endoftext|>")
    assert opened.eos_token_ids == [eos] and opened.tokenizer.bos_token is None
    assert json.loads(opened.text_files["generation_config.json"])["eos_token_id"] == eos
    # flip one byte of the newest checkpoint's weights: it is skipped, the previous one opens
    file = run / "checkpoints" / "step_00000010" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    assert open_model(run).path.name == "step_00000005"
    with pytest.raises(CheckpointError, match="sha256"):
        open_model(run / "checkpoints" / "step_00000010")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../b"])
def test_state_json_file_names_must_stay_inside_the_checkpoint(tmp_path, name):
    run, _ = _toolkit_run(tmp_path)
    step = run / "checkpoints" / "step_00000010"
    state = json.loads((step / "state.json").read_text())
    state["files"][name] = "0" * 64
    (step / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="inside the checkpoint directory"):
        open_model(step)


def test_lora_checkpoint_of_a_pretrained_run_opens_merged(tmp_path):
    base = fixture("qwen2_tied")
    import dataclasses

    from ascend_llm.interop.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((base / "config.json").read_text()), name="qwen2_tied")
    cfg.pretrained = str(base)
    rng = np.random.default_rng(0)
    ref = hf_tensors(base)
    adapters, expected = {}, {}
    for cell, hf_name in (("layers.0.attention.wq", "model.layers.0.self_attn.q_proj.weight"),
                          ("layers.1.feed_forward.w2", "model.layers.1.mlp.down_proj.weight")):
        out_f, in_f = ref[hf_name].shape
        a, b = rng.normal(size=(2, in_f)), rng.normal(size=(out_f, 2))
        adapters[f"{cell}.lora_a"], adapters[f"{cell}.lora_b"] = a.astype(np.float32), b.astype(np.float32)
        expected[f"{cell}.weight"] = ref[hf_name] + (8.0 / 2) * (b.astype(np.float32).astype(np.float64)
                                                                 @ a.astype(np.float32).astype(np.float64))
    config = {"model": dataclasses.asdict(cfg), "lora": {"enabled": True, "rank": 2, "alpha": 8.0}}
    step = save_model_checkpoint(tmp_path / "ft", 3, adapters, config, base / "tokenizer.json")
    opened = open_model(step)
    for name, value in expected.items():
        np.testing.assert_allclose(opened.weights[name], value, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(opened.weights["layers.0.attention.wk.weight"],
                                  ref["model.layers.0.self_attn.k_proj.weight"].astype(np.float32))
    base_open = open_model(base, build=False)
    assert opened.eos_token_ids == base_open.eos_token_ids
    assert opened.tokenizer.config == base_open.tokenizer.config  # the base's tokenizer_config, not a toolkit one


def test_quantized_copy_of_an_hf_model_keeps_template_and_eos_list(tmp_path):
    from ascend_llm.config.quant import QuantConfig
    from ascend_llm.interop.quantized import save_quantized
    from ascend_llm.quant.apply import apply_quantization

    src = tmp_path / "qwen3"
    shutil.copytree(fixture("qwen3_qknorm"), src)
    gen = json.loads((src / "generation_config.json").read_text())
    gen["eos_token_id"] = [559, 3]
    (src / "generation_config.json").write_text(json.dumps(gen))
    opened = open_model(src)
    cfg = QuantConfig(bits=8, group_size=-1)
    done = apply_quantization(opened.model, cfg)
    save_quantized(opened.model, opened.config, cfg, list(done), tmp_path / "q8", opened.text_files)
    quantized = open_model(tmp_path / "q8")
    assert quantized.kind == "quantized" and quantized.eos_token_ids == [559, 3]
    assert quantized.tokenizer.chat_template == opened.tokenizer.chat_template
    messages = [{"role": "user", "content": "你好"}]
    assert quantized.tokenizer.apply_chat_template(messages) == opened.tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize("content, match", [
    (b"[1, 2]", "JSON object"), (b"{not json", "valid JSON"),
])
def test_unreadable_generation_config_is_one_error_naming_the_file(tmp_path, content, match):
    src = tmp_path / "m"
    shutil.copytree(fixture("qwen2_tied"), src)
    (src / "generation_config.json").write_bytes(content)
    with pytest.raises(InteropError, match=match) as info:
        open_model(src, build=False)
    assert "generation_config.json" in str(info.value)


def test_eos_id_outside_the_vocabulary_is_refused(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(fixture("qwen2_tied"), src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [10 ** 9]}))
    with pytest.raises(InteropError, match="eos_token_id"):
        open_model(src, build=False)


def test_a_directory_of_no_known_kind_is_one_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InteropError, match="Hugging Face directory"):
        open_model(tmp_path)


def test_adapters_without_a_pretrained_base_are_refused(tmp_path):
    import dataclasses

    from ascend_llm.config.model import ModelConfig

    cfg = ModelConfig(dim=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_hidden_dim=48, vocab_size=300,
                      max_seq_len=64)
    step = save_model_checkpoint(tmp_path / "r", 1, {"layers.0.attention.wq.lora_a": np.zeros((2, 32), np.float32)},
                                 {"model": dataclasses.asdict(cfg)})
    with pytest.raises(CheckpointError, match="pretrained"):
        open_model(step)


def test_model_pretrained_may_name_a_toolkit_run_to_continue_from(tmp_path):
    """Continued training starts from the toolkit's own model: architecture, EOS and weights of the newest
    verified checkpoint, through the same opener."""
    from ascend_llm.interop.pretrained import pretrained_architecture, pretrained_weights

    run, weights = _toolkit_run(tmp_path)
    cfg, eos, root = pretrained_architecture(run)
    assert (cfg.dim, cfg.num_layers, cfg.vocab_size) == (32, 1, 300)
    assert eos == "<|endoftext|>" and root == run / "checkpoints" / "step_00000010"
    np.testing.assert_array_equal(pretrained_weights(run)["layers.0.attention.wq.weight"],
                                  weights["layers.0.attention.wq.weight"] + 10)


def test_a_quantized_directory_cannot_be_trained_from(tmp_path):
    from ascend_llm.config.quant import QuantConfig
    from ascend_llm.interop.pretrained import pretrained_architecture
    from ascend_llm.interop.quantized import save_quantized
    from ascend_llm.quant.apply import apply_quantization

    opened = open_model(fixture("qwen2_tied"))
    done = apply_quantization(opened.model, QuantConfig(bits=8, group_size=-1))
    save_quantized(opened.model, opened.config, QuantConfig(bits=8, group_size=-1), list(done), tmp_path / "q",
                   opened.text_files)
    with pytest.raises(InteropError, match="quantized"):
        pretrained_architecture(tmp_path / "q")


def test_the_documented_import_paths_still_open_models_the_one_way():
    """Scripts written against `hf.load` and `ascend_llm.interop.tokenizer` keep working, through the opener."""
    from ascend_llm.interop import hf
    from ascend_llm.interop.tokenizer import HFTokenizer as Legacy
    from ascend_llm.tokenizer.hf import HFTokenizer

    model, cfg, tokenizer = hf.load(fixture("qwen3_qknorm"))
    opened = open_model(fixture("qwen3_qknorm"), build=False)
    assert cfg == opened.config and Legacy is HFTokenizer and isinstance(tokenizer, HFTokenizer)
    assert {p.name for p in model.get_parameters()} == set(opened.weights)
