"""The official `openai` Python SDK against a real `ascend-llm serve` process on 127.0.0.1, for a Qwen2, a Qwen3 and a
Llama-3-style fixture, each plain and quantized (`ascend-llm quantize --bits 8`). One server per model.

References: the fixtures' transformers goldens (prompt ids, chat-template ids, greedy continuation), the model
directory's own tokenizer, and the API's documented shapes."""

from __future__ import annotations

import math

import openai
import pytest

from ascend_llm.tokenizer.hf import HFTokenizer
from tests.integration.openai_server import (
    END_OF_TEXT,
    EOT,
    FIXTURES,
    START_HEADER,
    golden,
    make_llama3_style,
    quantize,
    start_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("openai_sdk")]  # one xdist worker: fixtures start once
CONTEXT = 160  # --max-model-len: the golden chat prompts (<= 110 tokens) fit, "the rest of the context" stays short
MODELS = ["qwen2_tied", "qwen3_qknorm", "llama3", "qwen2_tied-int8", "qwen3_qknorm-int8", "llama3-int8"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    if not (FIXTURES / "llama_gqa").is_dir():
        pytest.skip(f"shared fixtures absent: {FIXTURES}")
    root = tmp_path_factory.mktemp("sdk_models")
    dirs = {"qwen2_tied": FIXTURES / "qwen2_tied", "qwen3_qknorm": FIXTURES / "qwen3_qknorm",
            "llama3": make_llama3_style(root / "llama3")}
    return dirs, root


@pytest.fixture(scope="module", params=MODELS)
def served(request, model_dirs, tmp_path_factory):
    dirs, root = model_dirs
    name = request.param
    base = name.removesuffix("-int8")
    path = dirs[base] if name == base else quantize(dirs[base], root / name)
    # one sequence at a time and 8-token prefill chunks: graph mode compiles 4 step shapes per server, not ~10
    # (batching is exercised by test_serve.py and bench serve)
    server = start_server(path, "--model-name", name, "--max-model-len", str(CONTEXT), "--max-num-seqs", "1",
                          "--max-prefill-chunk", "8", "--max-n", "4", log_dir=tmp_path_factory.mktemp("logs"))
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    yield name, base, client, HFTokenizer(dirs[base])
    assert server.stop() == 0, server.output()[-2000:]
    assert golden("qwen2_tied")["text"] not in server.output()  # prompts are never logged


EOS_IDS = {"qwen2_tied": [597], "qwen3_qknorm": [559], "llama3": [END_OF_TEXT, EOT]}
GOLDEN_OF = {"qwen2_tied": "qwen2_tied", "qwen3_qknorm": "qwen3_qknorm", "llama3": "llama_gqa"}


def complete(client, name, prompt, **kw):
    return client.completions.create(model=name, prompt=prompt, **{"temperature": 0, "max_tokens": 8, **kw})


def chat(client, name, messages, **kw):
    return client.chat.completions.create(model=name, messages=messages, **{"temperature": 0, "max_tokens": 8, **kw})


def user(text):
    return [{"role": "user", "content": text}]


def test_models_list_and_retrieve(served):
    name, _, client, _ = served
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.status_code == 404 and info.value.param == "model" and info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        complete(client, "no-such-model", "x")


def test_completion_prompt_ids_and_greedy_golden(served):
    name, base, client, tokenizer = served
    gold = golden(GOLDEN_OF[base])
    out = complete(client, name, gold["text"], max_tokens=12)
    assert out.usage.prompt_tokens == len(gold["text_input_ids"])  # BOS per tokenizer.json, once
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if name in ("qwen2_tied", "qwen3_qknorm"):  # transformers' greedy continuation of the plain model
        assert out.choices[0].text == tokenizer.decode(gold["greedy_continuation_ids"], skip_special_tokens=True)
        assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"


def test_chat_template_bos_once_and_text_parts(served):
    name, base, client, _ = served
    gold = golden(GOLDEN_OF[base])
    out = chat(client, name, gold["chat_messages"], max_tokens=1)
    assert out.usage.prompt_tokens == len(gold["chat_input_ids"])  # the model's template, BOS not doubled
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in gold["chat_messages"]]
    again = chat(client, name, parts, max_tokens=1)
    assert again.usage.prompt_tokens == out.usage.prompt_tokens
    assert again.choices[0].message.content == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, name, [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    assert info.value.param == "messages[0].content[1].type" and "image_url" in info.value.message


def test_streaming_matches_and_reports_usage(served):
    name, _, client, _ = served
    whole = complete(client, name, "床前明月光", max_tokens=10)
    pieces, finish, usage = [], None, None
    for chunk in complete(client, name, "床前明月光", max_tokens=10, stream=True,
                          stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].text and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == whole.usage.prompt_tokens
    whole_chat = chat(client, name, user("写一首诗"), max_completion_tokens=10)
    deltas, roles = [], []
    for chunk in chat(client, name, user("写一首诗"), max_completion_tokens=10, stream=True):
        for choice in chunk.choices:
            deltas.append(choice.delta.content or "")
            roles.append(choice.delta.role)
    assert "".join(deltas) == whole_chat.choices[0].message.content and roles[0] == "assistant"


def test_stop_strings(served):
    name, _, client, _ = served
    text = complete(client, name, "床前明月光", max_tokens=16).choices[0].text
    if len(text) < 5:
        pytest.skip(f"greedy text {text!r} too short for a stop string")
    stop = text[3:5]
    for value in (stop, [stop, "never-there"]):
        cut = complete(client, name, "床前明月光", max_tokens=16, stop=value)
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in complete(client, name, "床前明月光", max_tokens=16, stop=stop,
                                                           stream=True))
    assert streamed == text[:text.index(stop)]


def test_max_tokens_absent_is_the_rest_of_the_context(served):
    name, base, client, _ = served
    out = chat(client, name, user("写一首长诗"), max_tokens=None)
    if out.choices[0].finish_reason == "length":  # not OpenAI's legacy 16: up to the end of the context
        assert out.usage.prompt_tokens + out.usage.completion_tokens == CONTEXT
    else:  # or the model's own EOS (generation_config.json)
        assert out.choices[0].model_extra["stop_reason"] in EOS_IDS[base]
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, name, user("写"), **{"max_tokens": None, field: 10_000})
        assert info.value.param == field and str(CONTEXT) in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, name, "床", max_tokens=CONTEXT)
    assert info.value.param == "max_tokens"


def test_n_seed_temperature_top_p(served):
    name, _, client, _ = served
    kw = {"n": 3, "temperature": 1.5, "top_p": 0.95, "seed": 11, "max_tokens": 12}
    first = complete(client, name, "床前", **kw)
    again = complete(client, name, "床前", **kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seed: reproducible
    other = complete(client, name, "床前", **{**kw, "seed": 12})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    assert len({c.text for c in first.choices}) > 1  # each choice its own stream
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, name, "床前", n=5)
    assert info.value.param == "n"


def test_logprobs_shapes(served):
    name, _, client, _ = served
    out = chat(client, name, user("写一首诗"), max_tokens=6, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= out.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob <= 0
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-6)  # greedy: the chosen token is the top one
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-6 and entry.bytes == list(entry.token.encode())
    legacy = complete(client, name, "床前明月光", max_tokens=5, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert 1 <= len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) <= 5
    assert all(len(top) >= 1 and max(top.values()) == pytest.approx(p, abs=1e-6)
               for top, p in zip(lp.top_logprobs, lp.token_logprobs))
    chunks = chat(client, name, user("写一首诗"), max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5),
    ("frequency_penalty", 0.5), ("seed", -1), ("temperature", 1e-310), ("top_p", 0)])
def test_unimplemented_or_bad_fields_are_refused(served, field, value):
    name, _, client, _ = served
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, name, user("写"), **{field: value})
    assert info.value.param == field and info.value.type == "invalid_request_error"


def test_completion_only_fields_are_refused(served):
    name, _, client, _ = served
    for field, value in [("suffix", "end"), ("echo", True), ("best_of", 3)]:
        with pytest.raises(openai.BadRequestError) as info:
            complete(client, name, "床", **{field: value})
        assert info.value.param == field


def test_llama3_eos_list_and_special_tokens(served):
    """generation_config.json's EOS list ([<|end_of_text|>, <|eot_id|>]) stops generation (also in the quantized
    copy); a special token that is not an EOS (<|start_header_id|>) is generated but never shows up in the text,
    and a stop string inside its text never matches."""
    name, base, client, tokenizer = served
    if base != "llama3":
        pytest.skip("the Llama-3-style fixture only")
    gold = golden("llama_gqa")
    after_b0 = gold["text_input_ids"] + gold["greedy_continuation_ids"][:1]
    out = complete(client, name, after_b0, max_tokens=8)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == ""
    assert out.usage.completion_tokens == 1  # <|eot_id|>, an EOS from generation_config.json only
    out = complete(client, name, gold["text"], max_tokens=8, logprobs=0, stop=["start_header", "<|"])
    first = out.choices[0].logprobs.tokens[0]
    assert first == tokenizer.decode([START_HEADER])  # the special token was generated ...
    assert "<|" not in out.choices[0].text  # ... never shown ...
    assert not isinstance(out.choices[0].model_extra.get("stop_reason"), str)  # ... and no stop string matched it
    assert out.usage.completion_tokens > 1 and EOT != START_HEADER
