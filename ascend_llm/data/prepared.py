"""A prepared corpus directory (data/prepare.py writes it for text, data/sft.py for chat records)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ascend_llm.tokenizer.bpe import load_tokenizer

FORMAT_VERSION = "v2"


@dataclass
class PreparedData:
    path: Path
    meta: dict

    def tokens(self) -> np.memmap:
        return np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r",
                         shape=(self.meta["num_tokens"],))

    def doc_ends(self) -> np.ndarray:
        """(num_docs,) int64 positions of each document's EOS in tokens()."""
        file = self.path / "doc_ends.bin"
        return np.fromfile(file, dtype=np.int64) if file.is_file() else np.empty(0, np.int64)

    def tokenizer(self):
        return load_tokenizer(str(self.path / "tokenizer.json"), self.meta.get("eos_token"))
