"""A Hugging Face tokenizer directory: `tokenizer.json` (HF `tokenizers`), special tokens, chat template.

The chat template is rendered the way `transformers` does (`apply_chat_template`, see
transformers/utils/chat_template_utils.py): a jinja2 ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loopcontrols extension, `raise_exception` and `strftime_now` globals, a `tojson` filter that
keeps non-ASCII characters, the special tokens (bos_token, eos_token, ...) as variables; the rendered text is
tokenized without adding special tokens. The template comes from `chat_template.jinja` or, failing that, from
`tokenizer_config.json:chat_template` (a string, or a list of {name, template} where `default` is used).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

from ascend_llm.errors import InteropError

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict {"content": ...} or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InteropError(str(path), "unreadable", f"must be valid JSON ({exc})") from None


def _chat_template(root: Path, config: dict) -> str | None:
    file = root / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        return named.get("default")
    return template


def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise InteropError("chat_template", f"line {exc.lineno}", f"must be a valid jinja2 template ({exc})") from None


class HFTokenizer:
    """Tokenizer of a Hugging Face model directory.

    encode(text, add_special_tokens=True) -> list[int] (BOS/EOS per the tokenizer's post-processor);
    decode(ids, skip_special_tokens=False) -> str; apply_chat_template(messages, add_generation_prompt=True)
    -> list[int]; special tokens as attributes (`bos_token`, `eos_token`, ... text or None; `*_id` ints).
    """

    def __init__(self, root: Path):
        root = Path(root)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise InteropError(str(file), "missing", "a model directory needs tokenizer.json (HF tokenizers format)")
        self.root = root
        self.tokenizer = Tokenizer.from_file(str(file))
        config_file = root / "tokenizer_config.json"
        self.config = _read_json(config_file) if config_file.is_file() else {}
        self.special = {key: _token_text(self.config.get(key)) for key in SPECIAL_KEYS}
        self.chat_template = _chat_template(root, self.config)
        self._compiled = None

    def __getattr__(self, name: str):
        if name in SPECIAL_KEYS:
            return self.special[name]
        if name.endswith("_id") and name[:-3] in SPECIAL_KEYS:
            text = self.special[name[:-3]]
            return None if text is None else self.tokenizer.token_to_id(text)
        raise AttributeError(name)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The chat template's text for `messages` ([{"role", "content"}]); InteropError when there is none."""
        if not self.chat_template:
            raise InteropError(f"{self.root}/chat_template.jinja", "missing",
                               "this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self.special, **extra)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra), add_special_tokens=False)

    def save(self, out: Path) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out`; returns the names."""
        out = Path(out)
        self.tokenizer.save(str(out / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        names = ["tokenizer.json", "tokenizer_config.json"]
        if self.chat_template:
            (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            names.append("chat_template.jinja")
        return names
