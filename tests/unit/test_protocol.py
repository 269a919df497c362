"""OpenAI request bodies: every field is honoured or refused naming it; poisonous values never pass; limits hold."""

from __future__ import annotations

import json

import pytest

from ascend_llm.inference.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequest,
    Limits,
    chat_messages,
    check_logprobs,
    check_sampling,
    parse_body,
    prompt_list,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
LIMITS = Limits(max_stop=4, max_stop_chars=8, max_n=4)


def refused(kind, body: dict, limits: Limits = LIMITS) -> str:
    with pytest.raises(InvalidRequest) as info:
        parsed = parse_body(kind, body)
        check_sampling(parsed, limits, len(prompt_list(parsed.prompt)) if kind is CompletionRequest else 1)
        check_logprobs(parsed)
        if kind is ChatCompletionRequest:
            chat_messages(parsed.messages)
    return info.value.field


@pytest.mark.parametrize("field,value", [("max_tokens", "4"), ("max_tokens", True), ("n", 1.0), ("seed", "7"),
                                         ("temperature", "0.5"), ("stream", "yes"), ("top_logprobs", 2.0)])
def test_values_of_the_wrong_json_type_are_refused_not_coerced(field, value):
    """OpenAI answers 400 for "4" or true where an integer belongs; pydantic's lax mode would read them as 4 and 1."""
    assert refused(ChatCompletionRequest, {**CHAT, field: value}) == field


@pytest.mark.parametrize("field,value", [
    ("seed", -1), ("seed", 2 ** 63), ("temperature", 1e-310), ("temperature", float("inf")),
    ("temperature", float("nan")), ("temperature", -0.5), ("temperature", 2.5), ("repetition_penalty", 1e-320),
    ("repetition_penalty", float("nan")), ("top_p", 0), ("top_p", 1.5), ("top_p", float("nan")), ("n", 5),
    ("n", 0), ("max_tokens", 0), ("max_completion_tokens", -3), ("top_k", -2)])
def test_poisonous_values_are_refused_naming_the_field(field, value):
    assert refused(ChatCompletionRequest, {**CHAT, field: value}) == field


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 10}), ("presence_penalty", 0.5),
    ("frequency_penalty", -1), ("functions", [{"name": "f"}]), ("audio", {"voice": "x"}), ("store", True),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "low"), ("web_search_options", {}), ("service_tier", "flex"), ("unknown_field", 1)])
def test_unimplemented_chat_fields_are_refused_not_ignored(field, value):
    assert refused(ChatCompletionRequest, {**CHAT, field: value}) == field


@pytest.mark.parametrize("field,value", [("suffix", "end"), ("echo", True), ("best_of", 3), ("logit_bias", {"1": 1}),
                                         ("logprobs", 21), ("logprobs", -1)])
def test_unimplemented_completion_fields_are_refused(field, value):
    assert refused(CompletionRequest, {"prompt": "x", field: value}) == field


def test_neutral_values_of_unimplemented_fields_pass():
    body = parse_body(ChatCompletionRequest, {
        **CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0,
        "frequency_penalty": 0.0, "logit_bias": {}, "store": False, "modalities": ["text"], "user": "u",
        "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True, "n": 4, "seed": 2 ** 63 - 1,
        "temperature": 2.0, "top_p": 1.0, "repetition_penalty": 2.0, "logprobs": True, "top_logprobs": 20})
    check_sampling(body, LIMITS)
    assert check_logprobs(body) == 20
    completion = parse_body(CompletionRequest, {"prompt": "x", "best_of": 2, "n": 2, "echo": False, "suffix": None,
                                                "logprobs": 0})
    assert check_logprobs(completion) == 0


def test_limits_on_stop_n_and_prompts():
    assert refused(ChatCompletionRequest, {**CHAT, "stop": ["a"] * 5}) == "stop"
    assert refused(ChatCompletionRequest, {**CHAT, "stop": "x" * 9}) == "stop"
    assert refused(ChatCompletionRequest, {**CHAT, "stop": ["ok", "x" * 9]}) == "stop[1]"
    assert refused(ChatCompletionRequest, {**CHAT, "stop": [""]}) == "stop[0]"
    assert refused(CompletionRequest, {"prompt": ["a", "b", "c"], "n": 2}) == "n"  # 6 choices > max_n 4
    assert refused(CompletionRequest, {"prompt": []}) == "prompt"
    assert refused(ChatCompletionRequest, {**CHAT, "stream_options": {"include_usage": True}}) == "stream_options"
    assert refused(ChatCompletionRequest, {**CHAT, "top_logprobs": 2}) == "top_logprobs"  # needs logprobs: true
    assert prompt_list([[1, 2], [3]]) == [[1, 2], [3]] and prompt_list([5, 6]) == [[5, 6]]


def test_content_parts_are_joined_and_other_parts_named():
    body = parse_body(ChatCompletionRequest, {"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert chat_messages(body.messages) == [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "a\nb"},
                                            {"role": "assistant", "content": ""}]
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    with_image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]}
    assert refused(ChatCompletionRequest, with_image) == "messages[0].content[1].type"
    assert refused(ChatCompletionRequest, {"messages": [{"role": "tool", "content": "x"}]}) == "messages[0].role"
    assert refused(ChatCompletionRequest, {"messages": []}) == "messages"
    assert refused(ChatCompletionRequest, {"messages": [{"role": "user", "content": 3}]}) == "messages[0].content"


def test_errors_have_openai_shape():
    error = ApiError.from_user_error(InvalidRequest("seed", -1, "must be >= 0"))
    assert error.status == 400
    assert json.loads(json.dumps(error.body())) == {"error": {
        "message": "seed=-1: must be >= 0", "type": "invalid_request_error", "param": "seed", "code": None}}
    with pytest.raises(InvalidRequest) as info:
        parse_body(ChatCompletionRequest, {**CHAT, "stream_options": {"include_usage": True, "x": 1}})
    assert info.value.field == "stream_options.x"
