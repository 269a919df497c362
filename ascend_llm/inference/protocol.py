"""Request bodies of the OpenAI API as clients send them (/v1/completions, /v1/chat/completions), their checks,
and OpenAI's error shape.

Every field the OpenAI API defines is declared: the ones this server implements are honoured; the others
(tools, response_format, logit_bias, presence/frequency_penalty, suffix, echo, audio, ...) are accepted only at
their neutral value (null, 0, false, {"type": "text"}, ...) and otherwise refused with a 400 naming the field.
Informational fields (user, metadata, safety_identifier, prompt_cache_key) are accepted and not used. An unknown
field is a 400 naming it. Three vLLM extras are honoured: top_k, repetition_penalty and ignore_eos (benchmarks).

Errors: `ApiError(status, message, param, type, code).body()` is OpenAI's `{"error": {"message", "type", "param",
"code"}}`; `InvalidRequest(field, value, allowed)` (a UserInputError) is a 400 whose param is the field.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ascend_llm.errors import UserInputError

MAX_SEED = 2 ** 63 - 1  # OpenAI's seed is an int64; negative seeds are refused
MIN_TEMPERATURE = sys.float_info.min  # subnormal temperatures (1e-310) overflow logits / temperature
MAX_TEMPERATURE = 2.0  # OpenAI's range [0, 2]
REPETITION_PENALTY_RANGE = (0.01, 2.0)  # what the scheduler's SamplingParams accepts
MAX_TOP_LOGPROBS = 20  # OpenAI's chat top_logprobs bound; also used for completions' logprobs


class InvalidRequest(UserInputError):
    """A request field the server refuses: HTTP 400, param = field."""

    area = "request"


class ApiError(Exception):
    """An HTTP error in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[Union[str, int]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_user_error(cls, exc: UserInputError) -> ApiError:
        return cls(400, str(exc), exc.field, "invalid_request_error", None)


@dataclass
class Limits:
    """Bounds every request is checked against (CLI flags of `ascend-llm serve`).

    max_body_bytes: request body size; max_prompt_tokens: tokens of one prompt (at most the context length - 1);
    max_stop: strings in `stop`; max_stop_chars: characters of one stop string; max_n: choices of one request
    (n x prompts for completions)."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: Optional[int] = None
    max_stop: int = 16
    max_stop_chars: int = 256
    max_n: int = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "4" or true for an int is a 400, as OpenAI answers


class StreamOptions(_Body):
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # OpenAI's stream padding: there is none to turn off here


class _Sampling(_Body):
    """Fields shared by completions and chat."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None
    # defined by OpenAI, accepted at their neutral value only
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None


class CompletionRequest(_Sampling):
    """POST /v1/completions. prompt: a string, a list of strings, a list of token ids or a list of those."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ChatMessage(_Body):
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[Any]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[Any] = None
    refusal: Optional[str] = None
    audio: Optional[Any] = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    metadata: Optional[dict[str, Any]] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    audio: Optional[Any] = None
    modalities: Optional[list[str]] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[Any] = None
    service_tier: Optional[str] = None
    store: Optional[bool] = None
    prompt_cache_retention: Optional[Any] = None
    moderation: Optional[Any] = None


# field -> (neutral values test, what is allowed): anything else is refused with a 400 naming the field
_NEUTRAL = {
    "frequency_penalty": (lambda v: v in (None, 0), "only 0 or absent (no frequency penalty in this server)"),
    "presence_penalty": (lambda v: v in (None, 0), "only 0 or absent (no presence penalty in this server)"),
    "logit_bias": (lambda v: not v, "not supported by this server (omit it)"),
    "echo": (lambda v: not v, "only false (this server does not echo the prompt)"),
    "suffix": (lambda v: not v, "not supported by this server (no insertion; omit it)"),
    "tools": (lambda v: not v, "not supported by this server (no tool calling)"),
    "tool_choice": (lambda v: v in (None, "none"), "only \"none\" (no tool calling in this server)"),
    "functions": (lambda v: not v, "not supported by this server (no function calling)"),
    "function_call": (lambda v: v in (None, "none"), "only \"none\" (no function calling in this server)"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "only {\"type\": \"text\"} (no JSON mode or structured output in this server)"),
    "audio": (lambda v: v is None, "not supported by this server (text only)"),
    "modalities": (lambda v: v in (None, ["text"]), "only [\"text\"]"),
    "prediction": (lambda v: v is None, "not supported by this server (no predicted outputs)"),
    "reasoning_effort": (lambda v: v is None, "not supported by this server"),
    "verbosity": (lambda v: v is None, "not supported by this server"),
    "web_search_options": (lambda v: v is None, "not supported by this server (no web search)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only \"auto\" or \"default\""),
    "store": (lambda v: not v, "only false (this server stores nothing)"),
    "prompt_cache_retention": (lambda v: v is None, "not supported by this server"),
    "moderation": (lambda v: v is None, "not supported by this server"),
}


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|nullable|union|function-\w+)\[.*\])$")


def _location(loc: tuple) -> str:
    """pydantic's ('messages', 0, 'content') -> 'messages[0].content' (OpenAI's param style)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_TAG.match(str(part)):
            out += ("." if out else "") + str(part)
    return out or "body"


def parse_body(kind: type[_Sampling], data: object) -> _Sampling:
    """Validate a decoded JSON body; InvalidRequest naming the first offending field."""
    if not isinstance(data, dict):
        raise InvalidRequest("body", type(data).__name__, "must be a JSON object")
    try:
        body = kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _location(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            raise InvalidRequest(field, first.get("input"), "unknown field (not part of the OpenAI API this server "
                                                            "implements)") from None
        if first.get("type") == "missing":
            raise InvalidRequest(field, None, "required") from None
        value = first.get("input")
        raise InvalidRequest(field, _short(value), first.get("msg", "invalid")) from None
    for field, (neutral, allowed) in _NEUTRAL.items():
        if field in kind.model_fields and not neutral(getattr(body, field)):
            raise InvalidRequest(field, _short(getattr(body, field)), allowed)
    return body


def _short(value: object, limit: int = 80) -> object:
    text = repr(value)
    return value if len(text) <= limit else text[:limit] + "..."


def _finite(field: str, value: float, low: float, high: float, allowed: str) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequest(field, value, allowed)


def check_sampling(body: _Sampling, limits: Limits, num_prompts: int = 1) -> None:
    """Range checks that keep a request from hurting the batch it joins (non-finite or subnormal temperature,
    negative seed, huge stop lists, ...). InvalidRequest naming the field."""
    if body.temperature is not None and body.temperature != 0:
        _finite("temperature", body.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE,
                f"must be 0 (greedy) or a normal float in (0, {MAX_TEMPERATURE}]")
    if body.top_p is not None:
        _finite("top_p", body.top_p, 0.0, 1.0, "must be in (0, 1]")
        if body.top_p == 0:
            raise InvalidRequest("top_p", body.top_p, "must be in (0, 1] (use temperature 0 for greedy)")
    if body.top_k is not None and body.top_k < -1:
        raise InvalidRequest("top_k", body.top_k, "must be >= 0, or -1 / 0 for off")
    if body.repetition_penalty is not None:
        low, high = REPETITION_PENALTY_RANGE
        _finite("repetition_penalty", body.repetition_penalty, low, high, f"must be in [{low}, {high}] (1 = off)")
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        raise InvalidRequest("seed", body.seed, f"must be in [0, {MAX_SEED}]")
    if body.n < 1 or body.n * num_prompts > limits.max_n:
        what = "n" if num_prompts == 1 else f"n x {num_prompts} prompts"
        raise InvalidRequest("n", body.n, f"{what} must be in [1, {limits.max_n}] (--max-n)")
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value < 1:
            raise InvalidRequest(field, value, "must be >= 1 (absent = the rest of the context)")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options", body.stream_options.model_dump(exclude_none=True),
                             "only allowed when stream is true")
    check_stop(body.stop, limits)


def check_stop(stop: Optional[Union[str, list[str]]], limits: Limits) -> list[str]:
    """The stop strings as a list; InvalidRequest when there are too many, one is empty or too long."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop:
        raise InvalidRequest("stop", f"{len(stops)} strings", f"at most {limits.max_stop} (--max-stop)")
    for i, text in enumerate(stops):
        if not 1 <= len(text) <= limits.max_stop_chars:
            raise InvalidRequest(f"stop[{i}]" if isinstance(stop, list) else "stop", _short(text),
                                 f"must be 1..{limits.max_stop_chars} characters (--max-stop-chars)")
    return stops


def check_logprobs(body: _Sampling) -> Optional[int]:
    """Top alternatives per token to return (None = no logprobs). Chat: logprobs bool + top_logprobs 0..20;
    completions: logprobs 0..20 (OpenAI caps it at 5; vLLM at 20)."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise InvalidRequest("top_logprobs", body.top_logprobs, "requires logprobs: true")
            if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
                raise InvalidRequest("top_logprobs", body.top_logprobs, f"must be in [0, {MAX_TOP_LOGPROBS}]")
        return (body.top_logprobs or 0) if body.logprobs else None
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest("logprobs", body.logprobs, f"must be in [0, {MAX_TOP_LOGPROBS}]")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequest("best_of", body.best_of, f"only equal to n={body.n} (no server-side best-of)")
    return body.logprobs


ROLES = ("system", "developer", "user", "assistant")


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """[{"role", "content"[, "name"]}] for the chat template: text parts joined with newlines (as vLLM does),
    "developer" read as "system". InvalidRequest naming the message field for anything else."""
    if not messages:
        raise InvalidRequest("messages", [], "must hold at least one message")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role not in ROLES:
            raise InvalidRequest(f"{where}.role", message.role, f"must be one of {', '.join(ROLES)} (no tool "
                                                                "calling in this server)")
        for field in ("tool_calls", "tool_call_id", "function_call", "audio"):
            if getattr(message, field):
                raise InvalidRequest(f"{where}.{field}", _short(getattr(message, field)),
                                     "not supported by this server (no tool calling or audio)")
        content = message.content
        if isinstance(content, list):
            content = "\n".join(_text_part(part, f"{where}.content[{j}]") for j, part in enumerate(content))
        if content is None:
            if message.role != "assistant":
                raise InvalidRequest(f"{where}.content", None, "required (a string or a list of text parts)")
            content = ""
        entry = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def _text_part(part: dict, where: str) -> str:
    kind = part.get("type")
    if kind != "text":
        raise InvalidRequest(f"{where}.type", kind, "only \"text\" content parts (this server reads text only)")
    if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
        raise InvalidRequest(where, _short(part), "a text part is {\"type\": \"text\", \"text\": string}")
    return part["text"]


def prompt_list(prompt: Union[str, list]) -> list[Union[str, list[int]]]:
    """Completions' prompt as a list of strings or token-id lists; InvalidRequest for an empty one."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise InvalidRequest("prompt", [], "must not be empty")
    return list(prompt)


FinishReason = Literal["stop", "length"]
