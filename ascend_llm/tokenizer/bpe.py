"""Byte-level BPE tokenizer (HF `tokenizers`): train on a corpus sample or load a tokenizer.json; encode text
so that special-token strings inside it stay text.

Over-long runs without whitespace (DNA, base64, unpunctuated CJK) are cut into pieces of at most MAX_RUN
characters by a Split pre-tokenizer stored in the tokenizer itself, so training (quadratic in the length of a
pre-token) cannot stall and encoding uses the same cuts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from ascend_llm.errors import DataError

EOS = "<|endoftext|>"
MAX_RUN = 64


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """Byte-level BPE with the 256 byte symbols always present, so any text encodes without unknowns."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\S{{{MAX_RUN}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def load_tokenizer(path: str, eos: str | None = None) -> Tokenizer:
    """A tokenizer.json that defines the end-of-text token `eos` (default `<|endoftext|>`); DataError if not."""
    eos = eos or EOS
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError("data.tokenizer", path, "must be an existing tokenizer.json file")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError("data.tokenizer", path, f"not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
    if tokenizer.token_to_id(eos) is None:
        raise DataError("data.tokenizer", path, f"must define the end-of-text token {eos!r} (data.eos_token)")
    return tokenizer


def special_strings(tokenizer: Tokenizer) -> list[str]:
    """The strings the tokenizer would turn into added/special ids when they appear in text."""
    return sorted({t.content for t in tokenizer.get_added_tokens_decoder().values()}, key=len, reverse=True)


def _split_specials(text: str, specials: Sequence[str]) -> list[str]:
    """Cut text so no piece contains a special string: each occurrence is split after its first 2 characters
    (`<|` | `endoftext|>`), which is also where the byte-level pre-tokenizer splits it."""
    pieces = [text]
    for special in specials:
        cut = min(2, len(special) - 1) if len(special) > 1 else 0
        out = []
        for piece in pieces:
            parts = piece.split(special)
            for i, part in enumerate(parts):
                if i:
                    out[-1] += special[:cut]
                    part = special[cut:] + part
                out.append(part)
        pieces = out
    return [p for p in pieces if p]


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], specials: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each text (no special tokens added), batch-encoded in parallel by `encode_batch`.

    Special-token strings inside a text are encoded as ordinary text (tiktoken's disallowed_special
    behaviour), so data cannot inject an end-of-text id. Round trip: decode(ids) == text for byte-level BPE.
    """
    specials = special_strings(tokenizer) if specials is None else specials
    plain, split_at = [], {}
    for i, text in enumerate(texts):
        if specials and any(s in text for s in specials):
            pieces = _split_specials(text, specials)
            split_at[i] = (len(plain), len(pieces))
            plain.extend(pieces)
        else:
            split_at[i] = (len(plain), 1)
            plain.append(text)
    encoded = [e.ids for e in tokenizer.encode_batch(plain, add_special_tokens=False)]
    out = []
    for i in range(len(texts)):
        start, count = split_at[i]
        out.append(encoded[start] if count == 1 else [t for ids in encoded[start:start + count] for t in ids])
    return out
