"""Hugging Face import: logits, tokenizer and chat template equal the transformers goldens of every fixture in
../shared/fixtures/hf; unsupported configs are refused with the key named; llama3 RoPE scaling equals
transformers' inverse frequencies."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ascend_llm.cli.main import main as cli_main
from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError
from ascend_llm.interop.hf_config import model_config_from_hf
from ascend_llm.interop.safetensors_io import read_tensors
from ascend_llm.interop.source import open_model
from ascend_llm.models.llama import rope_inv_freq

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), None)
NAMES = ["llama_gqa", "qwen2_tied", "qwen3_qknorm", "llama_bf16"]
LOGIT_TOL = 1e-4  # the bound; measured max |diff| is ~4e-6 (float32 accumulation order)


def fixture(name: str) -> Path:
    if FIXTURES is None:
        pytest.skip("shared fixtures absent: ../shared/fixtures/hf")
    return FIXTURES / name


@pytest.fixture(scope="module", autouse=True)
def pynative():
    """Two shapes per fixture: eager is faster here than compiling a graph for each."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.parametrize("name", NAMES)
def test_logits_tokenizer_and_chat_template_match_transformers(name):
    opened = open_model(fixture(name))
    model, cfg, tokenizer = opened.model, opened.config, opened.tokenizer
    golden = read_tensors(fixture(f"{name}.golden.safetensors"))
    meta = json.loads(fixture(f"{name}.golden.json").read_text())
    for ids_key, logits_key in (("text_input_ids", "text_logits"), ("batch_input_ids", "batch_logits")):
        logits = model(Tensor(golden[ids_key].astype(np.int32)))
        assert logits.dtype == ms.float32 and logits.shape == golden[logits_key].shape
        np.testing.assert_allclose(logits.asnumpy(), golden[logits_key], rtol=0, atol=LOGIT_TOL)
    assert tokenizer.encode(meta["text"]) == meta["text_input_ids"]
    assert tokenizer.render_chat(meta["chat_messages"], add_generation_prompt=True) == meta["chat_text"]
    assert tokenizer.apply_chat_template(meta["chat_messages"]) == meta["chat_input_ids"]
    assert cfg.vocab_size == golden["text_logits"].shape[-1]


def test_config_features_per_family():
    gqa = model_config_from_hf(json.loads(fixture("llama_gqa/config.json").read_text()))
    qwen2 = model_config_from_hf(json.loads(fixture("qwen2_tied/config.json").read_text()))
    qwen3 = model_config_from_hf(json.loads(fixture("qwen3_qknorm/config.json").read_text()))
    assert (gqa.num_kv_heads, gqa.tie_embeddings, gqa.qkv_bias, gqa.rope_theta) == (2, False, False, 1e4)
    assert (qwen2.num_kv_heads, qwen2.tie_embeddings, qwen2.qkv_bias, qwen2.rope_theta, qwen2.norm_eps) == \
        (1, True, True, 1e6, 1e-6)  # old-style keys: rope_theta at top level, torch_dtype
    assert (qwen3.head_dim, qwen3.dim // qwen3.num_heads, qwen3.qk_norm, qwen3.tie_embeddings) == (32, 16, True, True)
    assert open_model(fixture("qwen3_qknorm"), weights=False).eos_token_ids == [559]


def _llama3(hd, original):
    return ModelConfig(dim=4 * hd, num_heads=4, num_kv_heads=4, rope_theta=500000.0, rope_scaling_type="llama3",
                       rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                       rope_original_max_seq_len=original)


# transformers 5.24 ROPE_INIT_FUNCTIONS["llama3"] (float32) for these two configs.
LLAMA3_HD16_ORIG64 = [1.0, 0.07940301299095154, 0.004700753837823868, 0.0009115831344388425,
                      0.00017677668074611574, 3.428102354519069e-05, 6.647869668086059e-06, 1.289173155782919e-06]
LLAMA3_HD128_ORIG8192_EVERY8 = [1.0, 0.193922758102417, 0.03760603070259094, 0.00729266507551074,
                                0.0005248460220173001, 3.428102354519069e-05, 6.647869668086059e-06,
                                1.289173155782919e-06]
LLAMA3_HD128_ORIG8192_28_TO_36 = [0.0032114461064338684, 0.0021665706299245358, 0.0013718936825171113,  # smoothed
                                  0.0008567514596506953, 0.0005248460220173001, 0.0003126936499029398,
                                  0.0001785077911335975, 9.556212171446532e-05]


def test_llama3_rope_scaling_matches_transformers():
    np.testing.assert_allclose(rope_inv_freq(_llama3(16, 64)), LLAMA3_HD16_ORIG64, rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(_llama3(128, 8192))[::8], LLAMA3_HD128_ORIG8192_EVERY8, rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(_llama3(128, 8192))[28:36], LLAMA3_HD128_ORIG8192_28_TO_36, rtol=1e-6)
    plain = rope_inv_freq(ModelConfig(dim=512, num_heads=4, rope_theta=500000.0))
    assert np.isclose(plain[-1], 8 * rope_inv_freq(_llama3(128, 8192))[-1], rtol=1e-12)  # low freq / factor
    raw = json.loads(fixture("llama_gqa/config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = model_config_from_hf(raw)
    assert (cfg.rope_scaling_type, cfg.rope_original_max_seq_len, cfg.rope_theta) == ("llama3", 64, 5e5)


BAD_CONFIGS = [
    ("architectures", ["MistralForCausalLM"], "config.json:architectures"),
    ("use_sliding_window", True, "config.json:use_sliding_window"),
    ("layer_types", ["sliding_attention", "full_attention"], "config.json:layer_types"),
    ("num_experts", 8, "config.json:num_experts"),
    ("hidden_act", "gelu", "config.json:hidden_act"),
    ("attention_bias", True, "config.json:attention_bias"),
    ("dtype", "float8_e4m3fn", "config.json:dtype"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "config.json:rope_parameters.rope_type"),
    ("quantization_config", {"quant_method": "gptq"}, "config.json:quantization_config"),
    ("hidden_size", None, "config.json:hidden_size"),
]


@pytest.mark.parametrize("key,value,named", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_unsupported_configs_are_refused_naming_the_key(key, value, named):
    raw = copy.deepcopy(json.loads(fixture("llama_gqa/config.json").read_text()))
    if value is None:
        del raw[key]
    else:
        raw[key] = value
    with pytest.raises(InteropError) as info:
        model_config_from_hf(raw)
    assert info.value.one_line().startswith(f"model import error: {named}=")
    assert "\n" not in info.value.one_line()


def test_old_style_rope_scaling_key_is_named(tmp_path):
    raw = json.loads(fixture("qwen2_tied/config.json").read_text())
    raw["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(InteropError, match=r"config.json:rope_scaling.rope_type='dynamic'"):
        model_config_from_hf(raw)


def test_cli_refuses_a_bad_directory_in_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "moe"
    shutil.copytree(fixture("qwen3_qknorm"), bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["architectures"] = ["DeepseekV2ForCausalLM"]
    (bad / "config.json").write_text(json.dumps(raw))
    assert cli_main(["generate", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json:architectures=['DeepseekV2ForCausalLM']" in err
    (bad / "model.safetensors").unlink()
    (bad / "config.json").write_text(fixture("qwen3_qknorm/config.json").read_text())
    assert cli_main(["convert", str(bad), "--to", "hf", "--output", str(tmp_path / "out")]) == 2
    assert "model.safetensors='missing'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
