"""A prepared corpus directory (data/prepare.py writes it for text, data/sft.py for chat records)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascend_llm.tokenizer.bpe import load_tokenizer

FORMAT_VERSION = "v2"


@dataclass
class PreparedData:
    """A prepared corpus directory `path` (tokens.bin, doc_ends.bin, tokenizer.json) and its meta.json as `meta`
    (num_tokens, dtype, vocab_size, eos_token, ...)."""

    path: Path
    meta: dict

    def tokens(self) -> np.memmap:
        """The token stream (num_tokens,) in meta's dtype (uint16 or uint32), memory-mapped read-only."""
        return np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r",
                         shape=(self.meta["num_tokens"],))

    def doc_ends(self) -> np.ndarray:
        """(num_docs,) int64 positions of each document's EOS in tokens()."""
        file = self.path / "doc_ends.bin"
        return np.fromfile(file, dtype=np.int64) if file.is_file() else np.empty(0, np.int64)

    def tokenizer(self):
        """The directory's tokenizer.json as an HF `tokenizers.Tokenizer` with its EOS token (meta's eos_token, default
        `<|endoftext|>`). Raises DataError when the file is missing, unreadable or lacks the EOS token."""
        return load_tokenizer(str(self.path / "tokenizer.json"), self.meta.get("eos_token"))
