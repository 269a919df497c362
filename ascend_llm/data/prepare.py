"""Corpus -> tokenizer -> token memmap with a JSON sidecar, cached by the corpus and settings.

Layout of a prepared directory: tokens.bin (uint16 or uint32 ids, documents separated by EOS),
tokenizer.json, meta.json (num_tokens, dtype, vocab_size, eos_id, num_docs, source). Written into a
temporary directory and renamed into place, so a prepared directory is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ascend_llm.config.data import DataConfig
from ascend_llm.data.corpus import corpus_files, read_documents
from ascend_llm.data.tokenizer import EOS, load_tokenizer, train_tokenizer
from ascend_llm.errors import DataError


@dataclass
class PreparedData:
    path: Path
    meta: dict

    def tokens(self) -> np.memmap:
        return np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r",
                         shape=(self.meta["num_tokens"],))

    def tokenizer(self):
        return load_tokenizer(str(self.path / "tokenizer.json"))


def cache_key(cfg: DataConfig) -> str:
    """Hash of everything the prepared tokens depend on: files (path, size, mtime) and settings."""
    files, fmt = corpus_files(cfg.path, cfg.format)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    tokenizer_hash = "trained"
    if cfg.tokenizer:
        tokenizer_hash = hashlib.sha256(Path(cfg.tokenizer).expanduser().read_bytes()).hexdigest()
    digest.update(f"{fmt}|{cfg.text_field}|{cfg.max_bytes}|{cfg.vocab_size}|{tokenizer_hash}|v1".encode())
    return digest.hexdigest()[:16]


def write_prepared(cfg: DataConfig, out_dir: Path, key: str) -> PreparedData:
    """Tokenize the corpus described by cfg into out_dir (which must not exist yet); atomic."""
    docs = read_documents(cfg.path, cfg.format, cfg.text_field, cfg.max_bytes)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer(docs, cfg.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    if not cfg.tokenizer and vocab_size > cfg.vocab_size:
        raise DataError("data.vocab_size", cfg.vocab_size, f"tokenizer came out with {vocab_size} ids")
    eos_id = tokenizer.token_to_id(EOS)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    encoded = tokenizer.encode_batch(docs, add_special_tokens=False)
    num_tokens = sum(len(e.ids) + 1 for e in encoded)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        tokens = np.memmap(tmp / "tokens.bin", dtype=dtype, mode="w+", shape=(num_tokens,))
        pos = 0
        for enc in encoded:
            ids = enc.ids
            tokens[pos:pos + len(ids)] = ids
            tokens[pos + len(ids)] = eos_id
            pos += len(ids) + 1
        tokens.flush()
        del tokens
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {"num_tokens": int(num_tokens), "dtype": np.dtype(dtype).name, "vocab_size": int(vocab_size),
                "eos_id": int(eos_id), "num_docs": len(docs), "source": cfg.path or "<python stdlib>",
                "format": cfg.format, "tokenizer": cfg.tokenizer or "trained byte-level BPE", "key": key}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedData(out_dir, json.loads((out_dir / "meta.json").read_text()))


def prepare(cfg: DataConfig, out_dir: Optional[str] = None) -> PreparedData:
    """Return the prepared corpus, building it on first use (cache_dir/<key>) or into out_dir."""
    key = cache_key(cfg)
    target = Path(out_dir).expanduser() if out_dir else Path(cfg.cache_dir).expanduser() / key
    meta_file = target / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if out_dir and meta.get("key") != key:  # in the cache the key is the directory name
            raise DataError("output", str(target), "holds a corpus prepared from other files or settings; "
                            "choose a new path or delete it")
        return PreparedData(target, meta)
    if target.exists() and any(target.iterdir()):
        raise DataError("output", str(target), "exists and is not a prepared corpus; choose an empty path")
    if target.exists():
        target.rmdir()
    return write_prepared(cfg, target, key)
