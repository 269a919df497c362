"""SFT rendering for any chat template (data/chat_render.py) and the record formats (data/records.py).

Reference: tests/unit/data/chat_goldens.json, written by make_chat_goldens.py with transformers 5.25: the ids
`apply_chat_template(tokenize=True)` returns under each template of tests/unit/data/chat_templates/ (ChatML, the
fixtures' Llama 3, Qwen3's official template from case 03), and the assistant mask `return_assistant_tokens_mask`
returns under a copy of each template whose assistant turns are wrapped in {% generation %} blocks. Our labels
come from the unmarked template (turn-by-turn location) and from the marked copy (our own {% generation %}
tracker): both must equal transformers' mask token for token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ascend_llm.compose import compose_recipe
from ascend_llm.errors import DataError

DATA = Path(__file__).resolve().parent / "data"
GOLDENS = json.loads((DATA / "chat_goldens.json").read_text(encoding="utf-8"))
FIXTURES = next((p / "shared" / "fixtures" / "hf" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures" / "hf").is_dir()), Path("shared/fixtures/hf"))
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared fixtures absent: ../shared/fixtures/hf")
CONVS = GOLDENS["conversations"]


def _tokenizer(fixture: str, template: str):
    from ascend_llm.tokenizer.hf import HFTokenizer

    tok = HFTokenizer(FIXTURES / fixture)
    tok.chat_template = (DATA / "chat_templates" / f"{template}.jinja").read_text(encoding="utf-8")
    return tok


@pytest.mark.parametrize("variant", ["", "_generation"], ids=["turn_by_turn", "generation_blocks"])
@pytest.mark.parametrize("key", sorted(GOLDENS["goldens"]))
def test_labels_equal_transformers_assistant_mask(key, variant):
    from ascend_llm.data.chat_render import render_with_labels
    from ascend_llm.data.records import record_conversation

    golden = GOLDENS["goldens"][key]
    tok = _tokenizer(golden["fixture"], golden["template"] + variant)
    ids, flags = render_with_labels(tok, record_conversation(CONVS[golden["conversation"]]))
    assert ids == golden["input_ids"]
    assert [int(f) for f in flags] == golden["assistant_masks"]


def test_qwen3_earlier_turn_learned_as_the_whole_rendering_writes_it():
    """Case 03: the earlier answer is learned without <think></think> (as written mid-conversation), the last
    one with it; the prefix-only rule refused the conversation."""
    from ascend_llm.data.chat_render import render_with_labels
    from ascend_llm.data.records import record_conversation

    tok = _tokenizer("qwen3_qknorm", "qwen3_official")
    ids, flags = render_with_labels(tok, record_conversation(CONVS["two_turns_system"]))
    learned = tok.decode([i for i, f in zip(ids, flags) if f])
    assert learned == ("明月几时有，把酒问青天。<|im_end|>\n"
                       "<think>\n\n</think>\n\n床前明月光，疑是地上霜。<|im_end|>\n")


def _ids_flags(record, template="qwen3_official", fixture="qwen3_qknorm"):
    from ascend_llm.data.chat_render import render_with_labels
    from ascend_llm.data.records import record_conversation

    return render_with_labels(_tokenizer(fixture, template), record_conversation(record))


def test_sharegpt_system_tools_and_function_calls_equal_the_openai_record():
    golden = GOLDENS["goldens"]["qwen3_official/tool_call"]
    sharegpt = {"id": "x1", "tools": json.dumps(CONVS["tool_call"]["tools"]), "conversations": [
        {"from": "human", "value": "What rhymes with moon?"},
        {"from": "function_call", "value": json.dumps({"name": "rhyme", "arguments": {"word": "moon"}})},
        {"from": "observation", "value": "[\"soon\", \"June\"]"},
        {"from": "gpt", "value": "Soon and June rhyme with moon."}]}
    ids, flags = _ids_flags(sharegpt)
    assert (ids, [int(f) for f in flags]) == (golden["input_ids"], golden["assistant_masks"])
    golden = GOLDENS["goldens"]["qwen3_official/two_turns_system"]
    turns = CONVS["two_turns_system"]["messages"]
    sharegpt = {"system": turns[0]["content"], "conversations": [
        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in turns[1:]]}
    assert _ids_flags(sharegpt)[0] == golden["input_ids"]


def test_openai_text_parts_join_like_a_string():
    answer = CONVS["one_turn"]["messages"][1]["content"]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text",
                                                                                     "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
    plain = {"messages": [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": answer}]}
    assert _ids_flags(parts, "chatml", "qwen2_tied") == _ids_flags(plain, "chatml", "qwen2_tied")  # vLLM's "\n"


@pytest.mark.parametrize("record,reason,named", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]}, "unsupported_content", "image_url"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "unsupported_field", "weight"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "images": ["a.png"]},
     "unsupported_field", "images"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "unsupported_field", "chosen"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{}]"},
     "tools_unsupported", "tools"),
])
def test_fields_that_cannot_be_used_are_refused_by_name(record, reason, named):
    from ascend_llm.data.records import BadRecord

    with pytest.raises(BadRecord, match=named) as info:
        _ids_flags(record, "chatml", "qwen2_tied")
    assert info.value.reason == reason


def _recipe(tmp_path, data, *extra):
    return compose_recipe([f"model.pretrained={FIXTURES / 'qwen2_tied'}", "data.format=sft", f"data.path={data}",
                           "data.document_mask=true", "data.seq_len=64", f"data.cache_dir={tmp_path / 'cache'}",
                           *extra])


def test_alpaca_json_array_file_with_history(tmp_path):
    from ascend_llm.data.prepare import prepare

    records = [{"instruction": "題", "input": "", "output": "詩", "history": [["早", "安"]]},
               {"instruction": "問", "input": "五言", "output": "答"}]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    report = prepare(_recipe(tmp_path, data).data).meta["report"]
    assert (report["records"], report["conversations"]) == (2, 2)
    assert report["assistant_tokens"] > 0
    data.write_text(json.dumps(records[0]), encoding="utf-8")  # an object, not an array: one bad record
    with pytest.raises(DataError, match="JSON array"):
        prepare(_recipe(tmp_path, data).data)


def test_skipped_records_are_said_on_the_console(tmp_path, capsys):
    from ascend_llm.data.prepare import prepare

    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([json.dumps(CONVS["one_turn"]), "{bad", json.dumps({"messages": [
        {"role": "user", "content": "q"}]})]) + "\n", encoding="utf-8")
    prepare(_recipe(tmp_path, data, "data.on_bad_record=skip").data)
    err = capsys.readouterr().err
    assert "skipped 2 record(s) (invalid_json 1, no_assistant 1); first: mixed.jsonl:2: invalid JSON" in err


def test_small_sft_set_still_validates(tmp_path):
    from ascend_llm.data.prepare import prepare
    from ascend_llm.data.sft import SFTDataset

    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(json.dumps(CONVS[k]) for k in ("one_turn", "three_turns", "two_turns_system")),
                    encoding="utf-8")
    dataset = SFTDataset(prepare(_recipe(tmp_path, data).data), 64, 0.1, 0)
    assert dataset.num_val == 1 and dataset.num_train >= 1
    rows = dataset.val_indices(4)  # one validation micro-batch of 4 rows from a single held-out window
    assert rows.tolist() == [dataset.num_train] * 4
    x, y = dataset.batch(rows)
    assert x.shape == (4, 64) and np.all(x == x[0])


def test_template_that_moves_the_system_prompt_into_the_last_user_turn_is_refused():
    """Mistral-style: the system prompt is written into the last user turn, so the turns before an earlier
    answer render differently in the whole conversation; locating that answer by a common prefix would start
    its labels inside the user's prompt. Refused instead."""
    from ascend_llm.data.chat_render import render_with_labels
    from ascend_llm.data.records import BadRecord, record_conversation

    tok = _tokenizer("qwen2_tied", "chatml")
    tok.chat_template = ("{% set sys = messages[0].content if messages[0].role == 'system' else '' %}"
                         "{% for m in messages %}{% if m.role == 'user' %}[INST] {% if loop.last or loop.index0 == "
                         "messages|length - 2 %}{{ sys }} {% endif %}{{ m.content }} [/INST]{% elif m.role == "
                         "'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}")
    with pytest.raises(BadRecord, match="last user turn") as info:
        render_with_labels(tok, record_conversation(CONVS["two_turns_system"]))
    assert info.value.reason == "template"
    ids, flags = render_with_labels(tok, record_conversation(CONVS["one_turn"]))  # one turn: no ambiguity
    assert tok.decode([i for i, f in zip(ids, flags) if f]) == CONVS["one_turn"]["messages"][1]["content"] + "</s>"
