"""Byte-level BPE tokenizer (HF `tokenizers`): train on the corpus or load a tokenizer.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ascend_llm.errors import DataError

EOS = "<|endoftext|>"


def train_tokenizer(docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the 256 byte symbols always present, so any text encodes without unknowns."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError("data.tokenizer", path, "must be an existing tokenizer.json file")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError("data.tokenizer", path, f"not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
    if tokenizer.token_to_id(EOS) is None:
        raise DataError("data.tokenizer", path, f"must define the end-of-text token {EOS!r}")
    return tokenizer
