"""Writes chat_goldens.json: what transformers' apply_chat_template returns for the test conversations under the
templates in chat_templates/ (input ids; for the `*_generation.jinja` copies, which wrap each assistant turn's
learned text in {% generation %} blocks, also return_assistant_tokens_mask's mask). Run with a Python that has
transformers (not a project dependency): /work/peer-venv/bin/python tests/unit/data/make_chat_goldens.py"""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
FIXTURES = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "fixtures" / "hf"
TOOLS = [{"type": "function", "function": {"name": "rhyme", "description": "Words that rhyme with a word",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}},
                                                          "required": ["word"]}}}]
CONVERSATIONS = {
    "two_turns_system": {"messages": [
        {"role": "system", "content": "你是一位诗人。"}, {"role": "user", "content": "写一句关于月亮的诗。"},
        {"role": "assistant", "content": "明月几时有，把酒问青天。"}, {"role": "user", "content": "再来一句。"},
        {"role": "assistant", "content": "床前明月光，疑是地上霜。"}]},
    "one_turn": {"messages": [{"role": "user", "content": "hi there"},
                              {"role": "assistant", "content": "Hello! How can I help?"}]},
    "reasoning_earlier_turn": {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
    "three_turns": {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d e f"}, {"role": "user", "content": "g"},
        {"role": "assistant", "content": "h"}]},
    "tool_call": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "What rhymes with moon?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "rhyme", "arguments": {"word": "moon"}}}]},
        {"role": "tool", "content": "[\"soon\", \"June\"]"},
        {"role": "assistant", "content": "Soon and June rhyme with moon."}]},
}
TEMPLATES = {"chatml": "qwen2_tied", "llama3": "llama_bf16", "qwen3_official": "qwen3_qknorm"}
TOOL_TEMPLATES = {"qwen3_official"}


def main() -> None:
    out = {}
    for name, fixture in TEMPLATES.items():
        tok = AutoTokenizer.from_pretrained(FIXTURES / fixture)
        for conv_name, conv in CONVERSATIONS.items():
            if "tools" in conv and name not in TOOL_TEMPLATES:
                continue
            kwargs = {"tools": conv["tools"]} if "tools" in conv else {}
            tok.chat_template = (HERE / "chat_templates" / f"{name}.jinja").read_text()
            ids = tok.apply_chat_template(conv["messages"], tokenize=True, return_dict=True, **kwargs)["input_ids"]
            tok.chat_template = (HERE / "chat_templates" / f"{name}_generation.jinja").read_text()
            marked = tok.apply_chat_template(conv["messages"], tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True, **kwargs)
            assert list(marked["input_ids"]) == list(ids), (name, conv_name)
            out[f"{name}/{conv_name}"] = {"fixture": fixture, "template": name, "conversation": conv_name,
                                          "input_ids": list(ids), "assistant_masks": list(marked["assistant_masks"])}
    import transformers

    doc = {"transformers": transformers.__version__, "conversations": CONVERSATIONS, "goldens": out}
    (HERE / "chat_goldens.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(out)} goldens")


if __name__ == "__main__":
    main()
