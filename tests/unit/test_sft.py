"""model.pretrained, SFT data (data/sft.py) and LoRA in the trainer, on the tiny HF fixtures (../shared).

Label references are the chat template's text written out by hand in the test (qwen2_tied's ChatML template),
decoded back from the labelled ids; the LoRA count is r * (in + out) per adapted matrix from the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.data.dataset import IGNORE_INDEX
from ascend_llm.errors import ConfigError, DataError

FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), Path("shared/fixtures/hf"))
QWEN2 = FIXTURES / "qwen2_tied"  # template: <|im_start|>{role}\n{content}<|im_end|>\n ...
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared fixtures absent: ../shared/fixtures/hf")

RECORDS = [  # one per style, with the (system, user, assistant) texts the template must show
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "問一"},
                   {"role": "assistant", "content": "答一"}, {"role": "user", "content": "問二"},
                   {"role": "assistant", "content": "答二"}]},
     [("system", "S"), ("user", "問一"), ("assistant", "答一"), ("user", "問二"), ("assistant", "答二")]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
     [("user", "hi"), ("assistant", "hello there")]),
    ({"instruction": "題：春曉", "input": "五言", "output": "春眠不覺曉"},
     [("user", "題：春曉\n\n五言"), ("assistant", "春眠不覺曉")]),
]


def _sft_overrides(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={QWEN2}", "data.format=sft", f"data.path={data}", "data.document_mask=true",
            "data.seq_len=64", f"data.cache_dir={tmp_path / 'cache'}", *extra]


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("record,turns", RECORDS, ids=["messages", "sharegpt", "alpaca"])
def test_only_assistant_tokens_carry_labels(tmp_path, record, turns):
    from ascend_llm.data.prepare import prepare
    from ascend_llm.data.sft import SFTDataset
    from ascend_llm.tokenizer.hf import HFTokenizer

    recipe = compose_recipe(_sft_overrides(tmp_path, _write(tmp_path / "d.jsonl", [record] * 3), "data.val_fraction=0",
                                            "data.seq_len=128"))
    prepared = prepare(recipe.data)
    dataset = SFTDataset(prepared, 128, 0.0, 0)
    x, y, seg = dataset.batch(np.arange(dataset.num_train), with_segments=True)
    tok = HFTokenizer(QWEN2)
    # reference: the template text written out by hand; learned text = each assistant turn + its end token
    expected = "".join(c + "<|im_end|>\n" for role, c in turns if role == "assistant")
    whole = "".join(f"<|im_start|>{role}\n{c}<|im_end|>\n" for role, c in turns)
    for i, (row_x, row_y) in enumerate(zip(x, y)):
        count = len(dataset.rows[i])  # conversations packed into this row; the rest is padding
        assert tok.decode(row_y[row_y != IGNORE_INDEX].tolist()) == expected * count
        assert tok.decode(row_x[:len(tok.encode(whole, False)) * count].tolist()) == whole * count
    assert prepared.meta["report"]["conversations"] == 3


def test_bad_record_names_file_and_line_and_skip_counts(tmp_path):
    from ascend_llm.data.prepare import prepare

    data = _write(tmp_path / "bad.jsonl", [RECORDS[1][0], "{not json", {"conversations": [{"from": "human",
                                                                                               "value": "q"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        prepare(compose_recipe(_sft_overrides(tmp_path, data)).data)
    report = prepare(compose_recipe(_sft_overrides(tmp_path, data, "data.on_bad_record=skip")).data).meta["report"]
    assert (report["skipped_invalid_json"], report["skipped_no_assistant"], report["conversations"]) == (1, 1, 1)


def test_overlong_rule_counts(tmp_path):
    from ascend_llm.data.prepare import prepare

    long = {"instruction": "x", "output": "長" * 200}
    data = _write(tmp_path / "long.jsonl", [long, RECORDS[1][0]])
    report = prepare(compose_recipe(_sft_overrides(tmp_path, data)).data).meta["report"]
    assert (report.get("truncated"), report["conversations"]) == (1, 2)
    report = prepare(compose_recipe(_sft_overrides(tmp_path, data, "data.sft_overlong=drop")).data).meta["report"]
    assert (report.get("dropped_overlong"), report["conversations"]) == (1, 1)


def test_pretrained_sets_architecture_and_refuses_conflicts(tmp_path):
    raw = json.loads((QWEN2 / "config.json").read_text())
    recipe = compose_recipe([f"model.pretrained={QWEN2}", "model=debug", "data.seq_len=64"])
    assert (recipe.model.dim, recipe.model.num_layers, recipe.model.vocab_size, recipe.model.tie_embeddings) == (
        raw["hidden_size"], raw["num_hidden_layers"], raw["vocab_size"], raw["tie_word_embeddings"])
    assert recipe.data.eos_token == "<|endoftext|>"
    assert recipe.data.tokenizer == str((QWEN2 / "tokenizer.json").resolve())  # fixtures may sit behind a link
    with pytest.raises(ConfigError, match=r"model\.dim"):
        compose_recipe([f"model.pretrained={QWEN2}", "model.dim=128"])
    llama = compose_recipe([f"model.pretrained={FIXTURES / 'llama_bf16'}", "data.seq_len=64"])
    assert llama.data.eos_token == "<|end_of_text|>"  # generation_config.json's eos id, not <|endoftext|>


def test_lora_trainable_count_exact():
    from ascend_llm.models import build_model
    from ascend_llm.train.build import build_converters

    recipe = compose_recipe(["model=debug", "lora.enabled=true", "lora.rank=4", "lora.targets=[wq,wv,w2]"])
    m, r = recipe.model, 4
    model = build_converters(recipe).convert(build_model(m, seed=0))
    hd = m.dim // m.num_heads
    per_layer = r * (m.dim + m.num_heads * hd) + r * (m.dim + m.num_kv_heads * hd) + r * (m.ffn_hidden_dim + m.dim)
    params = model.trainable_params()
    assert sum(p.size for p in params) == m.num_layers * per_layer
    assert all(".lora_a" in p.name or ".lora_b" in p.name for p in params)  # the checkpointed model part


def test_lora_checkpoint_merges_into_pretrained_base():
    from ascend_llm.interop.safetensors_io import read_tensors
    from ascend_llm.interop.source import merge_lora_tensors

    rng = np.random.default_rng(0)
    hf = read_tensors(QWEN2 / "model.safetensors")
    q = hf["model.layers.1.self_attn.q_proj.weight"].astype(np.float64)  # (out, in)
    a, b = rng.normal(size=(4, q.shape[1])), rng.normal(size=(q.shape[0], 4))
    adapters = {"layers.1.attention.wq.lora_a": a.astype(np.float32),
                "layers.1.attention.wq.lora_b": b.astype(np.float32)}
    config = {"model": {"pretrained": str(QWEN2), "tie_embeddings": True}, "lora": {"rank": 4, "alpha": 8.0}}
    merged = merge_lora_tensors(config, adapters)
    expected = q + 8.0 / 4 * b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(merged["layers.1.attention.wq.weight"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(merged["layers.0.attention.wk.weight"], hf["model.layers.0.self_attn.k_proj.weight"])
    assert not any("lora" in name for name in merged)


def test_pretrained_text_data_ends_documents_with_the_models_eos(tmp_path):
    from ascend_llm.data.prepare import prepare

    corpus = tmp_path / "c.txt"
    corpus.write_text("one small document\n", encoding="utf-8")
    recipe = compose_recipe([f"model.pretrained={FIXTURES / 'llama_bf16'}", f"data.path={corpus}",
                             "data.seq_len=16", f"data.cache_dir={tmp_path / 'cache'}"])
    prepared = prepare(recipe.data)
    eos = json.loads((FIXTURES / "llama_bf16" / "generation_config.json").read_text())["eos_token_id"]
    assert prepared.meta["eos_id"] == eos and int(prepared.tokens()[-1]) == eos
    assert prepared.tokenizer().id_to_token(eos) == "<|end_of_text|>"


def test_sft_cache_follows_seq_len(tmp_path):
    from ascend_llm.data.prepare import prepare

    data = _write(tmp_path / "long.jsonl", [{"instruction": "x", "output": "長" * 200}])
    short = prepare(compose_recipe(_sft_overrides(tmp_path, data)).data)
    longer = prepare(compose_recipe(_sft_overrides(tmp_path, data, "data.seq_len=200")).data)
    assert (short.meta["num_tokens"], longer.meta["num_tokens"]) == (65, 201)
