"""Chat records in the formats people keep -> a `Conversation` (messages for the chat template, tools).

Styles (one JSON object per record):
- OpenAI / HF chat: `{"messages": [{"role", "content", ...}], "tools": [...] (optional)}`. `content` is a string,
  null (an assistant turn that only calls tools) or a list of parts of type "text", joined with "\\n" as vLLM's
  chat front end does for string-content templates. `tool_calls`, `reasoning_content`, `name` and `tool_call_id`
  are passed to the template; any other key of a turn is refused with its name.
- ShareGPT / LLaMA-Factory: `{"conversations": [{"from", "value"}], "system": str, "tools": str|list}`: `system`
  becomes the first turn, `tools` (a JSON string or a list) goes to the template; `function_call` turns (value:
  JSON `{"name", "arguments"}`) become assistant tool calls, `observation` turns tool answers.
- Alpaca: `{"instruction", "input", "output", "system", "history": [[query, answer], ...]}`: the user turn is
  the instruction, a blank line and the input when it is non-empty; history turns come first.

Fields a text-only SFT cannot use (images, videos, audios) and preference fields (chosen, rejected) are refused
with one line naming them; other top-level keys (ids, metadata) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                  "function_call": "assistant", "observation": "tool"}
PASSED_KEYS = ("tool_calls", "reasoning_content", "name", "tool_call_id")
REFUSED_FIELDS = {"images": "media (text-only SFT)", "videos": "media (text-only SFT)",
                  "audios": "media (text-only SFT)",
                  "chosen": "a preference pair (train it with objective=dpo or objective=simpo)",
                  "rejected": "a preference pair (train it with objective=dpo or objective=simpo)"}


class BadRecord(ValueError):
    """A record that cannot be used: `reason` (the skip counter's key) and a one-line message."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    """Messages as the chat template takes them ([{"role", "content", ...}]) and the tool schemas (or None)."""

    messages: list[dict]
    tools: Optional[list] = field(default=None)


def content_text(content, where: str) -> str:
    """A message content as text: a string, None (-> ""), or a list of {"type": "text", "text": str} parts joined
    with "\\n". BadRecord naming `where` and the part for anything else."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRecord("bad_messages", f"{where}: content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadRecord("unsupported_content", f"{where}: content part {j} of type {kind!r} is not supported "
                            "(only {\"type\": \"text\", \"text\": str} parts)")
        texts.append(part["text"])
    return "\n".join(texts)


def openai_turns(items) -> list[dict]:
    """OpenAI-style turns -> messages for the template (module doc); BadRecord naming the turn and field."""
    if not isinstance(items, list) or not items:
        raise BadRecord("bad_messages", "`messages` must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(items):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise BadRecord("bad_messages", f"turn {i} must be an object with 'role' in {list(ROLES)}")
        extra = sorted(set(turn) - {"role", "content", *PASSED_KEYS})
        if extra:
            raise BadRecord("unsupported_field", f"turn {i}: field {extra[0]!r} is not supported (a turn holds "
                            f"role, content, {', '.join(PASSED_KEYS)})")
        if "content" not in turn and not turn.get("tool_calls"):
            raise BadRecord("bad_messages", f"turn {i} has no 'content'")
        message = {k: turn[k] for k in PASSED_KEYS if turn.get(k) is not None}
        out.append({"role": turn["role"], "content": content_text(turn.get("content"), f"turn {i}"), **message})
    return out


def _sharegpt_turns(items) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise BadRecord("bad_messages", "`conversations` must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(items):
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise BadRecord("bad_messages", f"turn {i} must be an object with 'from' in {sorted(SHAREGPT_ROLES)} "
                            "and a string 'value'")
        if role == "function_call":
            try:
                call = json.loads(turn["value"])
                call = {"name": call["name"], "arguments": call.get("arguments", {})}
            except (ValueError, TypeError, KeyError):
                raise BadRecord("bad_messages", f"turn {i}: a function_call value must be JSON "
                                "{\"name\": ..., \"arguments\": ...}") from None
            out.append({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]})
        else:
            out.append({"role": SHAREGPT_ROLES[role], "content": turn["value"]})
    return out


def _tools(value) -> Optional[list]:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRecord("bad_tools", "field 'tools' must be a JSON list of tool schemas") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRecord("bad_tools", "field 'tools' must be a list of tool schemas (objects)")
    return value


def _alpaca(record: dict) -> list[dict]:
    parts = [record.get(k) for k in ("instruction", "input", "output", "system")]
    if not all(isinstance(p, str) for p in parts[:3:2]) or not all(p is None or isinstance(p, str)
                                                                   for p in parts[1::2]):
        raise BadRecord("bad_messages", "instruction and output must be strings (input, system: optional)")
    instruction, given, output, system = parts
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(isinstance(t, str)
                                                                                          for t in h)
                                                for h in history):
        raise BadRecord("bad_messages", "field 'history' must be a list of [query, answer] string pairs")
    messages = [{"role": "system", "content": system}] if system else []
    for query, answer in history:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    user = instruction + (f"\n\n{given}" if given else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def record_conversation(record) -> Conversation:
    """The Conversation of one record in any of the three styles (module doc). BadRecord (reason, one line naming
    the field) if it fits none, holds a refused field, or has no assistant turn to learn."""
    if not isinstance(record, dict):
        raise BadRecord("not_object", "a record must be a JSON object")
    refused = next((k for k in REFUSED_FIELDS if k in record), None)
    if refused:
        raise BadRecord("unsupported_field", f"field {refused!r} is not supported: {REFUSED_FIELDS[refused]}")
    tools = _tools(record.get("tools"))
    if "messages" in record:
        messages = openai_turns(record["messages"])
    elif "conversations" in record:
        messages = _sharegpt_turns(record["conversations"])
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise BadRecord("bad_messages", "field 'system' must be a string")
        if system:
            if messages[0]["role"] == "system":
                raise BadRecord("bad_messages", "field 'system' given beside a system turn in 'conversations'")
            messages.insert(0, {"role": "system", "content": system})
    elif "instruction" in record and "output" in record:
        messages = _alpaca(record)
    else:
        raise BadRecord("no_conversation", "a record needs `messages`, `conversations` or `instruction`+`output`")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant", "the conversation has no assistant turn to learn")
    return Conversation(messages, tools)


def record_messages(record) -> list[dict]:
    """[{"role", "content", ...}] of one record (record_conversation without the tools)."""
    return record_conversation(record).messages
