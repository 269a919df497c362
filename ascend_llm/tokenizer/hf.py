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
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

from ascend_llm.errors import InteropError

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# The text files of a model directory: what a tokenizer is built from and what every writer copies along.
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "special_tokens_map.json")


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict {"content": ...} or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def parse_json_object(data: bytes, where: str) -> dict:
    """The JSON object encoded (UTF-8) in `data`; InteropError naming `where` (a file) when it is not valid
    JSON or not an object. The one JSON-object reader of model directories (tokenizer, opener, HF import)."""
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError as exc:  # also UnicodeDecodeError
        raise InteropError(where, "unreadable", f"must be valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InteropError(where, type(value).__name__, "must be a JSON object")
    return value


def _parse_json(files: dict[str, bytes], name: str, root: Path) -> dict:
    """parse_json_object of files[name], {} when absent."""
    return parse_json_object(files[name], str(Path(root) / name)) if name in files else {}


def _chat_template(config: dict) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (the `default` one)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


_SPANS: ContextVar = ContextVar("generation_spans", default=None)  # (rendered pieces, spans) while tracked


def _generation_extension():
    """The `{% generation %}...{% endgeneration %}` block of transformers' AssistantTracker: while a render is
    tracked, records (start, end) character offsets of each block's output."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTracker(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            tracking = _SPANS.get()
            if tracking is not None:
                start = sum(map(len, tracking[0]))
                tracking[1].append((start, start + len(text)))
            return text

    return GenerationTracker


def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols,
                                                                                        _generation_extension()])
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
    Raises InteropError naming the file when tokenizer.json is missing or unreadable, or tokenizer_config.json
    is not a JSON object.
    """

    def __init__(self, root: Path):
        root = Path(root)
        file = root / "tokenizer.json"
        if not file.is_file():
            raise InteropError(str(file), "missing", "a model directory needs tokenizer.json (HF tokenizers format)")
        files = {name: (root / name).read_bytes() for name in TEXT_FILES if (root / name).is_file()}
        self._setup(files, root)

    def _setup(self, files: dict[str, bytes], root: Path) -> None:
        self.root = Path(root)
        try:
            self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own exception type for malformed files
            raise InteropError(str(self.root / "tokenizer.json"), "unreadable",
                               f"must be a Hugging Face tokenizers file ({' '.join(str(exc).split())[:200]})") from None
        self.config = _parse_json(files, "tokenizer_config.json", self.root)
        self.special = {key: _token_text(self.config.get(key)) for key in SPECIAL_KEYS}
        template = files.get("chat_template.jinja")
        self.chat_template = template.decode("utf-8") if template is not None else _chat_template(self.config)
        self._compiled = None

    @classmethod
    def from_files(cls, files: dict[str, bytes], root: Path) -> HFTokenizer:
        """From the bytes of a model directory's text files (TEXT_FILES names; tokenizer.json required);
        `root` only names the files in errors."""
        if "tokenizer.json" not in files:
            raise InteropError(str(Path(root) / "tokenizer.json"), "missing", "a tokenizer needs tokenizer.json")
        tokenizer = cls.__new__(cls)
        tokenizer._setup(files, root)
        return tokenizer

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "special":  # not yet set (copy/pickle): no recursion
            raise AttributeError(name)
        if name in SPECIAL_KEYS:
            return self.special[name]
        if name.endswith("_id") and name[:-3] in SPECIAL_KEYS:
            text = self.special[name[:-3]]
            return None if text is None else self.tokenizer.token_to_id(text)
        raise AttributeError(name)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (`Tokenizer.get_vocab_size()`)."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens applies the tokenizer's post-processor (BOS/EOS).
        Through `encode_batch`, which releases the GIL (`Tokenizer.encode` holds it: a 1.2 M-character prompt kept
        every other thread, the server's event loop included, waiting for 2 s; the same ids)."""
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; skip_special_tokens drops special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _template(self):
        if not self.chat_template:
            raise InteropError(f"{self.root}/chat_template.jinja", "missing",
                               "this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        return self._compiled

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The chat template's text for `messages` ([{"role", "content"}]); InteropError when there is none."""
        return self._template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **self.special, **extra)

    def render_chat_spans(self, messages: list[dict], add_generation_prompt: bool = False,
                          **extra) -> tuple[str, list[tuple[int, int]]]:
        """(text, character spans of the template's `{% generation %}` blocks), as transformers'
        return_assistant_tokens_mask tracks them; spans are empty when the template has no such block."""
        template, pieces, spans = self._template(), [], []
        token = _SPANS.set((pieces, spans))
        try:
            for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self.special, **extra):
                pieces.append(piece)
        finally:
            _SPANS.reset(token)
        return "".join(pieces), spans

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> list[int]:
        """Token ids of `render_chat(messages, ...)`, encoded without adding special tokens (as transformers does).
        Raises InteropError when there is no chat template or it does not compile."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra), add_special_tokens=False)

    def text_files(self) -> dict[str, bytes]:
        """tokenizer.json, tokenizer_config.json and (when there is one) chat_template.jinja, as bytes."""
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        files = {"tokenizer.json": self.tokenizer.to_str().encode("utf-8"),
                 "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}
        if self.chat_template:
            files["chat_template.jinja"] = self.chat_template.encode("utf-8")
        return files

    def save(self, out: Path) -> list[str]:
        """Write `text_files()` into the directory `out`; returns the names written."""
        files = self.text_files()
        for name, data in files.items():
            (Path(out) / name).write_bytes(data)
        return list(files)
