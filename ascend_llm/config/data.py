"""Data schema (recipe group `data/`): corpus, tokenizer, blending, validation split and packing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ascend_llm.config.checks import in_range, one_of, positive
from ascend_llm.errors import ConfigError

FORMATS = ("auto", "txt", "jsonl", "json", "sft")
SFT_OVERLONG = ("truncate", "drop")
ON_BAD_RECORD = ("error", "skip")


def parse_sources(items: list, field_name: str = "data.sources") -> list[tuple[float, str]]:
    """[w1, p1, w2, p2, ...] (Megatron's --data-path convention) -> [(w1/sum, p1), ...]; ConfigError if malformed.

    A single path without weight is also accepted (weight 1)."""
    items = [str(x) for x in items]
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ConfigError(field_name, items, "must alternate weight and path: [0.7, a.jsonl, 0.3, b_folder]")
    pairs = []
    for i in range(0, len(items), 2):
        try:
            weight = float(items[i])
        except ValueError:
            raise ConfigError(f"{field_name}[{i}]", items[i], "must be a weight (> 0) before each path") from None
        if not weight >= 0:  # 0: validated only, never trained on (train/val_sources.py)
            raise ConfigError(f"{field_name}[{i}]", items[i], "weight must be >= 0 (0: validation only)")
        pairs.append((weight, items[i + 1]))
    total = sum(w for w, _ in pairs)
    if not total > 0:
        raise ConfigError(field_name, items, "at least one weight must be > 0")
    return [(w / total, path) for w, path in pairs]


@dataclass
class DataConfig:
    """Corpus, tokenizer, blending, validation split and packing of a run (recipe group `data/`); each field's
    meaning and unit is in the comment above it."""

    # None: the embedded default corpus (this interpreter's standard-library sources). A file or a folder
    # (.txt .md .py .rst .jsonl .json, each optionally .gz; the reader is chosen per file by suffix).
    path: Optional[str] = None
    # Blending, Megatron's --data-path convention: [weight, path, weight, path, ...]; replaces `path` when set.
    sources: list[str] = field(default_factory=list)
    # auto: reader per file suffix; txt | jsonl | json: force one reader for every file.
    format: str = "auto"
    text_field: str = "text"
    # error: a bad record (undecodable bytes, invalid JSON, non-string text) stops with file:line;
    # skip: drop it and count it per file and reason in the prepare report.
    on_bad_record: str = "error"
    # None: train a byte-level BPE tokenizer on a seeded sample of the corpus; else a path to a tokenizer.json.
    tokenizer: Optional[str] = None
    # End-of-text token of that tokenizer (None: `<|endoftext|>`); model.pretrained sets the model's own EOS.
    eos_token: Optional[str] = None
    # Seeded sample the tokenizer trains on (bytes). HF BPE training peaks at ~70 MB of RSS per MB of Chinese
    # sample (measured on the Tang poems), so 16 MB keeps it near 1.1 GB; encoding streams the whole corpus.
    tokenizer_sample_bytes: int = 16_000_000
    vocab_size: int = 4096
    seq_len: int = 256
    # Held-out share of documents (whole documents, or pieces of at most 16 windows of very long ones).
    val_fraction: float = 0.02
    # Packed windows carry document ids; attention is block-diagonal and cross-document targets are ignored.
    document_mask: bool = False
    seed: int = 1234
    # Cap on the raw corpus read (UTF-8 bytes, whole documents); None reads all of a given corpus (the embedded
    # corpus is the first 4 MB of the stdlib). prepare reports the cap and whether it was reached.
    max_bytes: Optional[int] = None
    cache_dir: str = "~/.cache/ascend_llm/data"
    # data.format=sft (data/sft.py): a conversation longer than seq_len + 1 tokens is cut to its first
    # seq_len + 1 tokens (truncate; dropped if no assistant token is left) or dropped; counts in the report.
    sft_overlong: str = "truncate"

    def validate(self, prefix: str = "data") -> None:
        """Raises ConfigError naming the field: format, on_bad_record or sft_overlong outside the allowed sets, a size
        <= 0, val_fraction outside [0, 0.5], malformed sources, or format=sft with sources or without document_mask."""
        one_of(f"{prefix}.format", self.format, FORMATS)
        one_of(f"{prefix}.on_bad_record", self.on_bad_record, ON_BAD_RECORD)
        positive(f"{prefix}.vocab_size", self.vocab_size)
        positive(f"{prefix}.seq_len", self.seq_len)
        positive(f"{prefix}.tokenizer_sample_bytes", self.tokenizer_sample_bytes)
        if self.max_bytes is not None:
            positive(f"{prefix}.max_bytes", self.max_bytes)
        in_range(f"{prefix}.val_fraction", self.val_fraction, 0.0, 0.5)
        if self.sources:
            parse_sources(self.sources, f"{prefix}.sources")
        one_of(f"{prefix}.sft_overlong", self.sft_overlong, SFT_OVERLONG)
        if self.format == "sft":
            if self.sources:
                raise ConfigError(f"{prefix}.sources", list(self.sources), "not supported with data.format=sft "
                                  "(give one file or folder in data.path)")
            if not self.document_mask:
                raise ConfigError(f"{prefix}.document_mask", self.document_mask, "must be true with "
                                  "data.format=sft (conversations are packed with document masks)")

