"""Data schema (recipe group `data/`): corpus, tokenizer and packing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ascend_llm.config.checks import in_range, one_of, positive

FORMATS = ("auto", "txt", "jsonl")


@dataclass
class DataConfig:
    # None: the embedded default corpus (this interpreter's standard-library sources).
    path: Optional[str] = None
    format: str = "auto"
    text_field: str = "text"
    # None: train a byte-level BPE tokenizer on the corpus; else a path to a tokenizer.json.
    tokenizer: Optional[str] = None
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.02
    seed: int = 1234
    # Cap on the raw corpus read (bytes); keeps the embedded corpus quick to tokenize.
    max_bytes: int = 4_000_000
    cache_dir: str = "~/.cache/ascend_llm/data"

    def validate(self, prefix: str = "data") -> None:
        one_of(f"{prefix}.format", self.format, FORMATS)
        positive(f"{prefix}.vocab_size", self.vocab_size)
        positive(f"{prefix}.seq_len", self.seq_len)
        positive(f"{prefix}.max_bytes", self.max_bytes)
        in_range(f"{prefix}.val_fraction", self.val_fraction, 0.0, 0.5)
