"""Token streams for evaluation and calibration: documents of a corpus, selected by a slice, tokenized and
joined with the end-of-text token (the layout `ascend-llm prepare` writes)."""

from __future__ import annotations

import numpy as np

from ascend_llm.errors import ConfigError, DataError


def parse_slice(text: str, field: str) -> slice:
    """'A:B' (Python slice bounds, either may be empty or negative) -> slice; ConfigError otherwise."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return slice(*(int(p) if p.strip() else None for p in parts))
    except ValueError:
        raise ConfigError(field, text, "must be START:END document indices, e.g. -300: for the last 300") from None


def token_stream(corpus: str, tokenizer, eos_id: int | None, docs: slice,
                 text_field: str = "text") -> tuple[np.ndarray, int]:
    """(ids (N,) int64, number of documents) for corpus documents `docs`: each encoded as a prompt would be
    (`tokenizer.encode`, an HFTokenizer: special tokens per its post-processor, e.g. Llama's BOS) and followed by
    `eos_id` (the model's first EOS id; None = no separator). DataError for an empty selection."""
    from ascend_llm.data.corpus import read_documents

    selected = read_documents(corpus, "auto", text_field, max_bytes=1 << 62)[docs]
    if not selected:
        raise DataError("corpus", corpus, f"no documents in the selection {docs.start}:{docs.stop}")
    ids: list[int] = []
    for doc in selected:
        ids.extend(tokenizer.encode(doc))
        if eos_id is not None:
            ids.append(int(eos_id))
    return np.asarray(ids, np.int64), len(selected)


def calibration_windows(ids: np.ndarray, num_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """(num_samples, seq_len) int32 windows at random offsets of the stream (GPTQ's calibration draw)."""
    if len(ids) <= seq_len:
        raise DataError("quant.calib_seq_len", seq_len, f"the calibration text has only {len(ids)} tokens")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, size=num_samples)
    return np.stack([ids[s:s + seq_len] for s in starts]).astype(np.int32)
