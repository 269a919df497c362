"""Supervised fine-tuning data (`data.format=sft`): chat records -> token ids with assistant-only labels,
packed into windows with document masks.

Records: .jsonl (one JSON object per line) or .json (one JSON array of objects), each optionally .gz, in the
styles of data/records.py (OpenAI messages with text parts and tools, ShareGPT with system/tools, Alpaca with
history). Rendering and labels: data/chat_render.py (the model's chat template renders the whole conversation as
transformers' apply_chat_template does; assistant turns are located turn by turn, or by the template's
{% generation %} blocks, and their tokens carry labels; every other label is IGNORE_INDEX (-100)).

Too-long conversations (more than seq_len + 1 tokens): `data.sft_overlong=truncate` keeps the first
seq_len + 1 tokens (dropped when no assistant token is left), `drop` drops them; both counted in the report.
Bad records (undecodable line, invalid JSON, wrong shape, a refused field, no assistant message, a template that
fails or whose assistant turns cannot be located) follow data.on_bad_record: `error` raises DataError naming
file:line (or file:[index] in a .json array), `skip` counts them per file and reason and says so in one line
per file on stderr.

Prepared layout (atomic, like data/prepare.py): tokens.bin, doc_ends.bin (index of each conversation's last
token), labels.bin (uint8, 1 where the token is an assistant token), tokenizer.json, meta.json.
Packing (`SFTDataset`): conversations are placed whole, in order, into windows of seq_len + 1 tokens (next-fit);
the rest of a window is padding (EOS id, its own segment, no labels). Each conversation is one segment.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ascend_llm.data.chat_render import render_with_labels
from ascend_llm.data.corpus import corpus_files
from ascend_llm.data.dataset import IGNORE_INDEX, EpochOrder, repeated_held_out
from ascend_llm.data.prepared import FORMAT_VERSION, PreparedData
from ascend_llm.data.readers import BOM, open_binary
from ascend_llm.data.records import BadRecord, record_conversation, record_messages
from ascend_llm.errors import DataError, UserInputError
from ascend_llm.store.files import write_dir_atomic

logger = logging.getLogger(__name__)
__all__ = ["BadRecord", "SFTDataset", "encode_conversations", "prepare_sft", "read_records", "record_messages",
           "render_with_labels"]

def _decode(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord("undecodable", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise BadRecord("invalid_json", f"invalid JSON ({exc})") from None


def read_records(path: Path):
    """(where, record or BadRecord) of each record of a file: a .json(.gz) file holding one JSON array (where =
    "[k]"; a file that is not an array is one bad record), else .jsonl lines (where = line number, blank lines
    skipped)."""
    if path.name.removesuffix(".gz").endswith(".json"):
        with open_binary(path) as handle:
            raw = handle.read()
        try:
            records = _decode(raw[len(BOM):] if raw.startswith(BOM) else raw)
        except BadRecord as exc:
            yield 1, exc
            return
        if not isinstance(records, list):
            yield 1, BadRecord("not_array", f"a .json SFT file must hold one JSON array of records, not a "
                               f"{type(records).__name__}")
            return
        yield from ((f"[{k}]", record) for k, record in enumerate(records))
        return
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if raw.strip():
                try:
                    yield number, _decode(raw)
                except BadRecord as exc:
                    yield number, exc


def say_skips(path: Path, skipped: Counter, first: str) -> None:
    """One console line (stderr) per file with skipped records: counts by reason and the first one's message."""
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    print(f"prepare: {path}: skipped {sum(skipped.values())} record(s) ({counts}); first: {first}", file=sys.stderr)


def encode_conversations(cfg, tokenizer) -> tuple[list[list[int]], list[list[bool]], dict]:
    """Every usable conversation of data.path as (ids, flags), cut or dropped per data.sft_overlong; the report."""
    limit = cfg.seq_len + 1
    corpus = corpus_files(cfg.path, "jsonl")
    ids_all, flags_all, counts, per_file = [], [], Counter(), {}
    for path, _ in corpus.files:
        skipped, first = Counter(), ""
        for number, record in read_records(path):
            counts["records"] += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                ids, flags = render_with_labels(tokenizer, record_conversation(record))
            except BadRecord as exc:
                if cfg.on_bad_record == "error":
                    raise DataError(f"{path}:{number}", exc.reason, f"{exc} (or set data.on_bad_record=skip)") from None
                skipped[exc.reason] += 1
                first = first or f"{path.name}:{number}: {exc}"
                continue
            if len(ids) > limit:
                if cfg.sft_overlong == "drop" or not any(flags[1:limit]):
                    counts["dropped_overlong"] += 1
                    continue
                counts["truncated"] += 1
                ids, flags = ids[:limit], flags[:limit]
            ids_all.append(ids)
            flags_all.append(flags)
        if skipped:
            per_file[str(path)] = dict(skipped)
            say_skips(path, skipped, first)
        counts.update({f"skipped_{k}": v for k, v in skipped.items()})
    report = {"source": corpus.source, "files": len(corpus.files), **dict(sorted(counts.items())),
              "conversations": len(ids_all), "tokens": sum(map(len, ids_all)),
              "assistant_tokens": int(sum(sum(f[1:]) for f in flags_all)), "overlong_rule": cfg.sft_overlong,
              "max_tokens": limit, "per_file_skips": per_file}
    return ids_all, flags_all, report


def prepare_sft(cfg, target: Path, key: str, progress: bool = False, field: str = "data.cache_dir") -> PreparedData:
    """Render, tokenize and label data.path into `target` (atomic: complete or absent; store/files.write_dir_atomic,
    OutputError naming `field` when it cannot be written)."""
    from ascend_llm.tokenizer.hf import HFTokenizer

    if not cfg.tokenizer:
        raise DataError("data.tokenizer", cfg.tokenizer, "data.format=sft needs a Hugging Face tokenizer with a "
                        "chat template: set model.pretrained=DIR (or data.tokenizer=DIR/tokenizer.json)")
    try:
        tokenizer = HFTokenizer(Path(cfg.tokenizer).expanduser().parent)
        if not tokenizer.chat_template:
            raise DataError("data.tokenizer", cfg.tokenizer, "data.format=sft needs a chat template beside it "
                            "(chat_template.jinja or tokenizer_config.json:chat_template)")
    except UserInputError as exc:
        raise DataError("data.tokenizer", cfg.tokenizer, exc.one_line()) from None
    ids_all, flags_all, report = encode_conversations(cfg, tokenizer)
    if not ids_all:
        raise DataError("data.path", cfg.path, f"holds no usable conversation ({json.dumps(report)})")
    eos_token = cfg.eos_token or tokenizer.eos_token
    eos_id = tokenizer.tokenizer.token_to_id(eos_token) if eos_token else None
    if eos_id is None:
        raise DataError("data.eos_token", eos_token, "must be a token of the tokenizer (padding uses it)")
    vocab = tokenizer.tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32

    def fill(tmp: Path) -> None:
        ends = np.cumsum([len(ids) for ids in ids_all]) - 1
        arrays = {"tokens.bin": np.concatenate([np.asarray(i, dtype) for i in ids_all]),
                  "doc_ends.bin": ends.astype(np.int64),
                  "labels.bin": np.concatenate([np.asarray(f, np.uint8) for f in flags_all])}
        meta = {"num_tokens": int(ends[-1] + 1), "dtype": np.dtype(dtype).name, "vocab_size": int(vocab),
                "eos_id": int(eos_id), "eos_token": eos_token, "num_docs": len(ids_all), "source": report["source"],
                "tokenizer": cfg.tokenizer, "format": "sft", "key": key, "format_version": FORMAT_VERSION,
                "report": report}
        files = {**arrays, "meta.json": json.dumps(meta, indent=2, ensure_ascii=False).encode()}
        for name, value in files.items():
            (tmp / name).write_bytes(value if isinstance(value, bytes) else value.tobytes())
        tokenizer.tokenizer.save(str(tmp / "tokenizer.json"))

    write_dir_atomic(target, fill, field=field, keep_existing=True)
    return PreparedData(target, json.loads((target / "meta.json").read_text()))


def _pack(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Next-fit packing of conversations `order` (each at most `capacity` tokens) into rows of `capacity`."""
    rows, row, used = [], [], 0
    for k in order:
        size = int(lengths[k])
        if row and used + size > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(int(k))
        used += size
    if row:
        rows.append(row)
    return rows


class SFTDataset:
    """Packed SFT windows (the PackedDataset interface the trainer uses): row ids [0, num_train) train,
    [num_train, num_train + num_val) validation. Held-out conversations: a seeded random set holding about
    val_fraction of the tokens (at least one conversation when val_fraction > 0 and there are two or more).
    Raises DataError when no training row is left."""

    def __init__(self, prepared: PreparedData, seq_len: int, val_fraction: float, seed: int):
        self.tokens = np.asarray(prepared.tokens())
        self.flags = np.fromfile(prepared.path / "labels.bin", dtype=np.uint8).astype(bool)
        ends = prepared.doc_ends()
        self.starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        self.lengths = ends + 1 - self.starts
        self.seq_len, self.seed, self.pad_id = seq_len, seed, int(prepared.meta["eos_id"])
        order = np.random.default_rng([seed, 0x5F7]).permutation(len(self.starts))
        is_val = np.zeros(len(order), bool)
        if val_fraction > 0 and len(order) > 1:
            taken = np.cumsum(self.lengths[order])
            count = min(int(np.searchsorted(taken, val_fraction * taken[-1])) + 1, len(order) - 1)
            is_val[order[:count]] = True
        index = np.arange(len(order))
        train, val = _pack(self.lengths, index[~is_val], seq_len + 1), _pack(self.lengths, index[is_val], seq_len + 1)
        self.rows, self.num_train, self.num_val = train + val, len(train), len(val)
        if self.num_train < 1:
            raise DataError("data.path", prepared.meta.get("source"), "no conversation left for training")
        if val_fraction > 0 and not self.num_val:
            logger.warning("data: %d conversation(s): none can be held out, so no val_loss (need 2 or more)",
                           len(order))
        self._order = EpochOrder(self.seed, self.num_train)

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, segment ids, assistant flags), each (seq_len + 1,), of packed row `index`; padding is
        pad_id in its own last segment with no flags."""
        size = self.seq_len + 1
        ids = np.full(size, self.pad_id, np.int32)
        segs, flags = np.full(size, len(self.rows[index]), np.int32), np.zeros(size, bool)
        position = 0
        for segment, k in enumerate(self.rows[index]):
            a, n = int(self.starts[k]), int(self.lengths[k])
            ids[position:position + n] = self.tokens[a:a + n]
            flags[position:position + n] = self.flags[a:a + n]
            segs[position:position + n] = segment
            position += n
        return ids, segs, flags

    def batch(self, indices: np.ndarray, with_segments: bool = False):
        """(x, y[, segment_ids]) int32 (B, seq_len): y is the next token where it is an assistant token of the
        same conversation, else IGNORE_INDEX."""
        parts = [self.row(int(i)) for i in indices]
        ids, segs, flags = (np.stack([p[j] for p in parts]) for j in range(3))
        labels = ids[:, 1:].copy()
        labels[~flags[:, 1:] | (segs[:, 1:] != segs[:, :-1])] = IGNORE_INDEX
        if not with_segments:
            return ids[:, :-1], labels
        return ids[:, :-1], labels, segs[:, :-1].copy()

    def train_indices(self, position: int, count: int) -> np.ndarray:
        """Row ids (count,) int64 for global positions [position, position + count): a seeded permutation
        per epoch (a pure function of (seed, position))."""
        return self._order.indices(position, count)

    def val_indices(self, count: int) -> np.ndarray:
        """Row ids of `count` held-out windows. A small SFT set with fewer held-out windows than asked for repeats
        them in order up to `count` (so one validation micro-batch can be formed and val_loss is reported; each
        window then weighs its number of repeats)."""
        return repeated_held_out(self.num_train, self.num_val, count)

    def describe_mix(self, position: int) -> dict:
        return {"data": {"weight": 1.0, "sequences": int(position), "share": 1.0}}

    def describe_split(self) -> dict:
        used = sum(int(self.lengths[k]) for row in self.rows for k in row)
        return {"train_windows": self.num_train, "val_windows": self.num_val, "conversations": len(self.starts),
                "packing_efficiency": round(used / max(len(self.rows) * (self.seq_len + 1), 1), 4)}
