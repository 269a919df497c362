"""Corpus -> tokenizer -> token memmap with a JSON sidecar, streamed, cached by the corpus and settings.

Layout of a prepared directory: tokens.bin (uint16 or uint32 ids, each document followed by EOS),
doc_ends.bin (int64 position of each document's EOS in tokens.bin), tokenizer.json, meta.json (num_tokens,
dtype, vocab_size, eos_id, num_docs, source, report). Written into a temporary directory and renamed into
place, so a prepared directory is complete or absent; the cache directory's name is the hash of the inputs.

Memory stays bounded by the batch, not the corpus: the tokenizer trains on a seeded sample of about
data.tokenizer_sample_bytes (documents kept with probability sample_bytes / corpus_bytes, decided by a hash of
(seed, document number)), then documents are streamed again, encoded ENCODE_BATCH_BYTES at a time with
`encode_batch` (parallel in Rust) and appended to tokens.bin.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ascend_llm.config.data import DataConfig, parse_sources
from ascend_llm.data.corpus import CorpusFiles, corpus_files, iter_documents
from ascend_llm.data.prepared import FORMAT_VERSION, PreparedData
from ascend_llm.errors import DataError, OutputError
from ascend_llm.store.files import write_dir_atomic, write_file_atomic
from ascend_llm.tokenizer.bpe import EOS, encode_texts, load_tokenizer, special_strings, train_tokenizer

ENCODE_BATCH_BYTES = 4 << 20
SFT_RENDER = "turns2"  # data/chat_render.py's rules: a new value re-prepares cached SFT data


def _hash_file(path: str) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def cache_key(cfg: DataConfig, path: Optional[str] = None, tokenizer: Optional[str] = None) -> str:
    """Hash of everything the prepared tokens depend on: files (path, size, mtime) and settings."""
    corpus = corpus_files(path if path is not None else cfg.path, cfg.format)
    digest = hashlib.sha256()
    for file, kind in corpus.files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{kind}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    tokenizer = tokenizer or cfg.tokenizer
    tokenizer_hash = _hash_file(tokenizer) if tokenizer else f"trained|{cfg.tokenizer_sample_bytes}|{cfg.seed}"
    digest.update(f"{cfg.text_field}|{cfg.on_bad_record}|{cfg.max_bytes}|{cfg.vocab_size}|{tokenizer_hash}|"
                  f"{FORMAT_VERSION}".encode())
    if cfg.eos_token:
        digest.update(f"|eos={cfg.eos_token}".encode())
    if cfg.format == "sft":  # rendering (chat template beside the tokenizer) and truncation at seq_len + 1
        beside = [Path(tokenizer).expanduser().parent / n for n in ("tokenizer_config.json", "chat_template.jinja")]
        digest.update(f"|sft|{SFT_RENDER}|{cfg.sft_overlong}|{cfg.seq_len}|"
                      f"{[_hash_file(str(f)) for f in beside if f.is_file()]}".encode())
    return digest.hexdigest()[:16]


def _keep(seed: int, number: int, probability: float) -> bool:
    """Seeded Bernoulli(probability) decision for document `number` (SplitMix64 hash, portable)."""
    if probability >= 1.0:
        return True
    z = (seed * 0x9E3779B97F4A7C15 + number * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53) < probability


def tokenizer_sample(corpora: list[CorpusFiles], cfg: DataConfig) -> list[str]:
    """A seeded sample of about cfg.tokenizer_sample_bytes of text pieces drawn across the given corpora."""
    sizes = [sum(p.stat().st_size for p, _ in c.files) for c in corpora]
    caps = [c.max_bytes(cfg.max_bytes) for c in corpora]
    total = sum(size if cap is None else min(size, cap) for size, cap in zip(sizes, caps))
    probability = min(1.0, cfg.tokenizer_sample_bytes / max(total, 1))
    sample, taken, number = [], 0, 0
    for corpus in corpora:
        for text, _ in iter_documents(corpus, cfg.on_bad_record, cfg.text_field, cfg.max_bytes):
            number += 1
            if _keep(cfg.seed, number, probability):
                sample.append(text)
                taken += len(text.encode("utf-8"))
                if taken >= cfg.tokenizer_sample_bytes:
                    return sample
    return sample


def build_tokenizer(cfg: DataConfig, corpora: list[CorpusFiles]):
    """The given tokenizer.json, or a byte-level BPE trained on a seeded sample of the corpora."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.eos_token)
    sample = tokenizer_sample(corpora, cfg)
    if not sample:
        raise DataError("data.path", cfg.path if cfg.path is not None else "<stdlib>", "corpus holds no non-empty text")
    tokenizer = train_tokenizer(sample, cfg.vocab_size, length=len(sample))
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise DataError("data.vocab_size", cfg.vocab_size, f"tokenizer came out with {tokenizer.get_vocab_size()} ids")
    return tokenizer


def _progress(total_bytes: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", file=sys.stderr, dynamic_ncols=True)


def encode_corpus(corpus: CorpusFiles, cfg: DataConfig, tokenizer, tmp: Path, dtype, progress: bool) -> dict:
    """Stream the corpus into tmp/tokens.bin and tmp/doc_ends.bin; returns the per-source report."""
    eos_id, specials = tokenizer.token_to_id(cfg.eos_token or EOS), special_strings(tokenizer)
    stats: list = []
    start, position, num_docs, num_bytes = time.perf_counter(), 0, 0, 0
    bar = _progress(sum(p.stat().st_size for p, _ in corpus.files), progress)
    with open(tmp / "tokens.bin", "wb") as tokens, open(tmp / "doc_ends.bin", "wb") as ends_file:
        batch, batch_bytes = [], 0

        def flush():
            nonlocal position, num_docs
            ids_list = encode_texts(tokenizer, [t for t, _ in batch], specials)
            ends = []
            for (_, ends_doc), ids in zip(batch, ids_list):
                out = ids + [eos_id] if ends_doc else ids
                tokens.write(np.asarray(out, dtype=dtype).tobytes())
                position += len(out)
                if ends_doc:
                    ends.append(position - 1)
            ends_file.write(np.asarray(ends, dtype=np.int64).tobytes())
            num_docs += len(ends)
            if bar is not None:
                bar.update(batch_bytes)
                bar.set_postfix(docs=num_docs, refresh=False)
            batch.clear()

        for text, ends_doc in iter_documents(corpus, cfg.on_bad_record, cfg.text_field, cfg.max_bytes, stats):
            batch.append((text, ends_doc))
            size = len(text.encode("utf-8"))
            batch_bytes, num_bytes = batch_bytes + size, num_bytes + size
            if batch_bytes >= ENCODE_BATCH_BYTES:
                flush()
                batch_bytes = 0
        flush()  # the files are fsync'ed by write_dir_atomic before the rename
    if bar is not None:
        bar.close()
    seconds, cap = time.perf_counter() - start, corpus.max_bytes(cfg.max_bytes)
    return {"source": corpus.source, "files": len(corpus.files), "files_read": len(stats),
            "ignored_files": corpus.ignored, "documents": num_docs, "skipped": _sum_skips(stats),
            "bytes": num_bytes, "tokens": position, "tokens_per_byte": round(position / max(num_bytes, 1), 4),
            "seconds": round(seconds, 3), "mb_per_s": round(num_bytes / 1e6 / max(seconds, 1e-9), 3),
            "max_bytes": cap, "capped": bool(cap is not None and num_bytes >= cap),
            "per_file_skips": {s.path: dict(s.skipped) for s in stats if s.skipped}}


def _sum_skips(stats: list) -> dict:
    total: dict = {}
    for s in stats:
        for reason, count in s.skipped.items():
            total[reason] = total.get(reason, 0) + count
    return dict(sorted(total.items()))


def write_prepared(cfg: DataConfig, corpus: CorpusFiles, tokenizer, out_dir: Path, key: str,
                   progress: bool = False, field: str = "data.cache_dir") -> PreparedData:
    """Tokenize one corpus with `tokenizer` into out_dir (absent or empty; when another process prepares the
    same corpus at the same time, the first complete copy is kept). Atomic (store/files.write_dir_atomic):
    OutputError naming `field` when out_dir cannot be written, nothing left behind."""
    vocab_size = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32

    def fill(tmp: Path) -> None:
        report = encode_corpus(corpus, cfg, tokenizer, tmp, dtype, progress)
        if report["documents"] == 0:
            raise DataError("data.path", corpus.source, "corpus holds no non-empty text "
                            f"(skipped: {report['skipped'] or 'nothing'})")
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {"num_tokens": report["tokens"], "dtype": np.dtype(dtype).name, "vocab_size": int(vocab_size),
                "eos_id": int(tokenizer.token_to_id(cfg.eos_token or EOS)), "eos_token": cfg.eos_token or EOS,
                "num_docs": report["documents"],
                "source": corpus.source, "tokenizer": cfg.tokenizer or "trained byte-level BPE", "key": key,
                "format_version": FORMAT_VERSION, "report": report}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    write_dir_atomic(out_dir, fill, field=field, keep_existing=True)
    return PreparedData(out_dir, json.loads((out_dir / "meta.json").read_text()))


def _cached(target: Path, key: str, explicit: bool) -> Optional[PreparedData]:
    if os.path.lexists(target) and not target.is_dir():
        raise OutputError("--output" if explicit else "data.cache_dir", str(target), "is a file, not a directory; "
                          "choose another path")
    meta_file = target / "meta.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        except ValueError as exc:  # a prepared corpus is written whole (write_dir_atomic): edited or damaged since
            raise DataError(str(meta_file), "unreadable", f"must be the JSON object prepare wrote ({exc}); delete "
                            f"{target} to prepare it again") from None
        if explicit and meta.get("key") != key:  # in the cache the key is the directory name
            raise DataError("output", str(target), "holds a corpus prepared from other files or settings; "
                            "choose a new path or delete it")
        return PreparedData(target, meta)
    if target.exists() and any(target.iterdir()):
        raise DataError("output", str(target), "exists and is not a prepared corpus; choose an empty path")
    return None


def prepare(cfg: DataConfig, out_dir: Optional[str] = None, progress: bool = False) -> PreparedData:
    """The prepared corpus of data.path (or of the first of data.sources), built on first use into
    cache_dir/<key> or out_dir. With data.sources use prepare_sources for all of them."""
    if cfg.sources:
        return prepare_sources(cfg, out_dir, progress)[0]
    key = cache_key(cfg)
    target = Path(out_dir).expanduser() if out_dir else Path(cfg.cache_dir).expanduser() / key
    found = _cached(target, key, bool(out_dir))
    if found is not None:
        return found
    if cfg.format == "sft":
        from ascend_llm.data.sft import prepare_sft

        return prepare_sft(cfg, target, key, progress, field="--output" if out_dir else "data.cache_dir")
    corpus = corpus_files(cfg.path, cfg.format)
    return write_prepared(cfg, corpus, build_tokenizer(cfg, [corpus]), target, key, progress,
                          field="--output" if out_dir else "data.cache_dir")


def prepare_sources(cfg: DataConfig, out_dir: Optional[str] = None, progress: bool = False) -> list[PreparedData]:
    """Every corpus of data.sources (or data.path alone), all with one tokenizer: the given one or one trained
    on a seeded sample across all sources. Each source gets its own prepared directory (out_dir/<i> or
    cache_dir/<key>); the shared tokenizer is kept in cache_dir/tokenizers/<key>.json."""
    if not cfg.sources:
        return [prepare(cfg, out_dir, progress)]
    paths = [path for _, path in parse_sources(cfg.sources)]
    fields = [f"data.sources[{2 * i + 1}]" for i in range(len(paths))]
    corpora = [corpus_files(path, cfg.format, name) for path, name in zip(paths, fields)]
    tokenizer_file = cfg.tokenizer
    if not tokenizer_file:
        joint = hashlib.sha256("|".join(cache_key(cfg, p) for p in paths).encode()).hexdigest()[:16]
        tokenizer_file = str(Path(cfg.cache_dir).expanduser() / "tokenizers" / f"{joint}.json")
        if not Path(tokenizer_file).is_file():
            write_file_atomic(tokenizer_file, build_tokenizer(cfg, corpora).to_str(pretty=True),
                              field="data.cache_dir")
    tokenizer = load_tokenizer(tokenizer_file, cfg.eos_token)
    prepared = []
    for i, (path, corpus) in enumerate(zip(paths, corpora)):
        key = cache_key(cfg, path, tokenizer_file)
        target = Path(out_dir).expanduser() / str(i) if out_dir else Path(cfg.cache_dir).expanduser() / key
        found = _cached(target, key, bool(out_dir))
        prepared.append(found or write_prepared(cfg, corpus, tokenizer, target, key, progress,
                                                field="--output" if out_dir else "data.cache_dir"))
    return prepared
