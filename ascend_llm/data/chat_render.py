"""A conversation rendered with the model's chat template, with the assistant's tokens located (SFT labels).

The text is the template's rendering of the whole conversation (add_generation_prompt=False), tokenized without
added special tokens: the ids transformers' `apply_chat_template(..., tokenize=True)` returns. Assistant spans
(character offsets into that text):

- Templates with `{% generation %}` blocks: the blocks' output, as transformers' `return_assistant_tokens_mask`.
- Any other template, turn by turn, so a template that renders a turn differently by its position (Qwen3 drops
  the reasoning block of earlier turns) still works and earlier turns keep their labels as the whole rendering
  writes them:
  start = length of the common prefix of the whole text and the rendering of the turns before it with the
  generation prompt (the role header is not learned); the rendering of those turns without the generation prompt
  must be a prefix of the whole text (a template that moves text into the last user turn is refused);
  content end = where a sentinel appended to the turn's content lands in the whole rendering;
  end = content end + what the template writes after the content when this turn is the last one, as far as the
  whole rendering writes the same (the end-of-turn token is learned; the next turn's header is not).
  A template that drops the content, writes it twice, or changes the rest of the text around it is refused.

A token is an assistant token when its characters overlap a span (transformers' rule).
"""

from __future__ import annotations

import os
import re

from ascend_llm.data.records import BadRecord, Conversation

SENTINEL = "\u2063\u2064\u2063"  # invisible separators: never trimmed by a template, unlikely in text
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _render(tokenizer, messages: list[dict], generation_prompt: bool, tools) -> str:
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=generation_prompt,
                                     **({"tools": tools} if tools else {}))
    except Exception as exc:  # jinja2 raises TemplateError, UndefinedError, TypeError... from the template's code
        raise BadRecord("template", f"the chat template fails on this conversation ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]})") from None


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _marked(messages: list[dict], i: int) -> list[dict]:
    out = list(messages)
    out[i] = {**messages[i], "content": (messages[i].get("content") or "") + SENTINEL}
    return out


def _turn_span(tokenizer, messages: list[dict], i: int, full: str, tools) -> tuple[int, int]:
    """(start, end) character span of assistant turn i in `full` (module doc)."""
    head = _render(tokenizer, messages[:i], True, tools) if i else ""
    if i and not full.startswith(_render(tokenizer, messages[:i], False, tools)):
        raise BadRecord("template", f"the chat template writes the turns before turn {i} differently when they end "
                        "the conversation (e.g. a system prompt in the last user turn), so the prompt of turn "
                        f"{i} cannot be told apart from its answer")
    start = _common_prefix(full, head)
    marked_full = _render(tokenizer, _marked(messages, i), False, tools)
    marked_last = _render(tokenizer, _marked(messages[:i + 1], i), False, tools)
    if marked_full.count(SENTINEL) != 1 or marked_last.count(SENTINEL) != 1:
        raise BadRecord("template", f"the chat template does not write turn {i}'s content exactly once, so its "
                        "assistant tokens cannot be located")
    after = marked_full.index(SENTINEL) + len(SENTINEL)
    tail = marked_last[marked_last.index(SENTINEL) + len(SENTINEL):]
    end_marked = after + _common_prefix(tail, marked_full[after:])
    # map end_marked back into `full`: it must lie in the text both renderings end with
    shift = len(marked_full) - len(full)
    same_tail = _common_prefix(full[::-1], marked_full[::-1])
    if end_marked < len(marked_full) - same_tail or not start < end_marked - shift:
        raise BadRecord("template", f"the chat template changes the text around turn {i}'s content, so its "
                        "assistant tokens cannot be located")
    return start, end_marked - shift


def assistant_spans(tokenizer, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """(whole rendering, assistant character spans in order) of a conversation (module doc).

    tokenizer: tokenizer.hf.HFTokenizer with a chat template. BadRecord("template" | "tools_unsupported") when the
    spans cannot be located or the record has tools the template does not render."""
    messages, tools = conversation.messages, conversation.tools
    template = tokenizer.chat_template or ""
    if tools and "tools" not in template:
        raise BadRecord("tools_unsupported", "field 'tools' is given but the chat template does not render tools")
    if GENERATION_TAG.search(template):
        try:
            text, spans = tokenizer.render_chat_spans(messages, False, **({"tools": tools} if tools else {}))
        except Exception as exc:  # the template's own errors, as in _render
            raise BadRecord("template", f"the chat template fails on this conversation ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]})") from None
        if not any(b > a for a, b in spans):
            raise BadRecord("template", "the chat template's {% generation %} blocks wrote no assistant text")
        return text, spans
    full = _render(tokenizer, messages, False, tools)
    spans = [_turn_span(tokenizer, messages, i, full, tools) for i, m in enumerate(messages)
             if m["role"] == "assistant"]
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise BadRecord("template", "assistant turns overlap in the chat template's rendering")
    return full, spans


def token_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does its character range [start, end) overlap a span (spans sorted, non-overlapping)?"""
    flags, k = [], 0
    for start, end in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        flags.append(k < len(spans) and end > spans[k][0])
    return flags


def render_with_labels(tokenizer, conversation: Conversation) -> tuple[list[int], list[bool]]:
    """(token ids, is-assistant flag per token) of a conversation rendered with its chat template (module doc).
    Raises BadRecord as assistant_spans."""
    text, spans = assistant_spans(tokenizer, conversation)
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    return list(encoding.ids), token_flags(encoding.offsets, spans)
