"""Preference pairs (objective.name=dpo | simpo): records -> (chosen, rejected) token rows with response labels.

Records (.jsonl lines or one .json array, optionally .gz; data.path): `{"prompt", "chosen", "rejected"}` (TRL's
explicit-prompt format), either
- plain text: three strings. Row = the tokenizer's leading special tokens (BOS when its post-processor adds one)
  + prompt ids + response ids + EOS, the prompt and the response tokenized separately (TRL's DPO tokenization),
  so the two rows share the prompt's ids exactly;
- chat: `prompt` a list of messages (data/records.py's OpenAI style), `chosen` / `rejected` an assistant string,
  message or list of messages. The conversation is rendered with the model's chat template (data/chat_render.py)
  and the response's assistant spans (those after the prompt's rendering with the generation prompt) are labelled.
Only response tokens carry labels (the prompt is masked). A pair longer than data.seq_len + 1 tokens is cut
(data.sft_overlong=truncate; dropped when a side keeps no response token) or dropped (drop).

Prepared directory (atomic, data.cache_dir/<key>, key = files, tokenizer, chat template, seq_len, rule):
pairs.npz (ids (N, 2, seq_len + 1) int32 padded with EOS, flags (N, 2, seq_len + 1) uint8), tokenizer.json, meta.json.
`PreferenceDataset` has the trainer's dataset interface (train_indices, val_indices, num_train, describe_*).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ascend_llm.data.chat_render import assistant_spans, token_flags
from ascend_llm.data.corpus import corpus_files
from ascend_llm.data.dataset import EpochOrder, repeated_held_out
from ascend_llm.data.prepared import FORMAT_VERSION, PreparedData
from ascend_llm.data.records import BadRecord, Conversation, content_text, openai_turns
from ascend_llm.data.sft import read_records, say_skips
from ascend_llm.errors import DataError, UserInputError
from ascend_llm.store.files import write_dir_atomic


def _response_messages(value, side: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    messages = openai_turns(value) if isinstance(value, list) else None
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRecord("bad_pair", f"field {side!r} must be a string or assistant message(s)")
    return messages


class PairEncoder:
    """Encodes one record into ((ids, flags) chosen, (ids, flags) rejected). tokenizer: tokenizer.hf.HFTokenizer."""

    def __init__(self, tokenizer, eos_id: int):
        self.tokenizer, self.eos_id = tokenizer, eos_id
        plain, special = tokenizer.encode("x", False), tokenizer.encode("x", True)
        self.lead = special[:len(special) - len(plain)] if special[-len(plain):] == plain else []

    def _text(self, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        head = self.lead + self.tokenizer.encode(prompt, False)
        tail = self.tokenizer.encode(response, False) + [self.eos_id]
        return head + tail, [False] * len(head) + [True] * len(tail)

    def _chat(self, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[bool]]:
        if not self.tokenizer.chat_template:
            raise BadRecord("template", "chat-message pairs need a chat template beside data.tokenizer")
        text, spans = assistant_spans(self.tokenizer, Conversation(prompt + response))
        try:
            head = self.tokenizer.render_chat(prompt, add_generation_prompt=True)
        except Exception as exc:  # the template's own errors
            raise BadRecord("template", f"the chat template fails on the prompt ({type(exc).__name__})") from None
        start = len(os.path.commonprefix([text, head]))
        spans = [(max(a, start), b) for a, b in spans if b > start]
        encoding = self.tokenizer.tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), token_flags(encoding.offsets, spans)

    def encode(self, record) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
        """Both sides of one record (module doc); BadRecord (reason, one line naming the field) if unusable."""
        if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
            raise BadRecord("bad_pair", "a preference record needs 'prompt', 'chosen' and 'rejected'")
        prompt = record["prompt"]
        if isinstance(prompt, str) and isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
            if not record["chosen"] or not record["rejected"]:
                raise BadRecord("bad_pair", "'chosen' and 'rejected' must be non-empty")
            return self._text(prompt, record["chosen"]), self._text(prompt, record["rejected"])
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list):
            prompt = openai_turns(prompt)
        else:
            raise BadRecord("bad_pair", "field 'prompt' must be a string or a list of messages")
        sides = []
        for side in ("chosen", "rejected"):
            messages = _response_messages(record[side], side)
            if not content_text(messages[-1].get("content"), side) and not messages[-1].get("tool_calls"):
                raise BadRecord("bad_pair", f"field {side!r} is empty")
            sides.append(self._chat(prompt, messages))
        return sides[0], sides[1]


def _fit(side: tuple[list[int], list[bool]], limit: int, rule: str):
    ids, flags = side
    if len(ids) <= limit:
        return ids, flags, False
    if rule == "drop" or not any(flags[1:limit]):
        return None, None, True
    return ids[:limit], flags[:limit], True


def encode_pairs(cfg, tokenizer, eos_id: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every usable pair of data.path: ids (N, 2, seq_len + 1) int32 (EOS-padded), flags (N, 2, seq_len + 1) uint8,
    and the report (records, pairs, skipped_<reason>, truncated, dropped_overlong). Bad records follow
    data.on_bad_record (DataError naming file:line, or counted and said on stderr)."""
    limit, encoder = cfg.seq_len + 1, PairEncoder(tokenizer, eos_id)
    rows, counts = [], Counter()
    for path, _ in corpus_files(cfg.path, "jsonl").files:
        skipped, first = Counter(), ""
        for where, record in read_records(path):
            counts["records"] += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                chosen, rejected = encoder.encode(record)
            except BadRecord as exc:
                if cfg.on_bad_record == "error":
                    raise DataError(f"{path}:{where}", exc.reason, f"{exc} (or set data.on_bad_record=skip)") from None
                skipped[exc.reason] += 1
                first = first or f"{path.name}:{where}: {exc}"
                continue
            fitted = [_fit(side, limit, cfg.sft_overlong) for side in (chosen, rejected)]
            if any(f[0] is None for f in fitted):
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += any(f[2] for f in fitted)
            rows.append(fitted)
        if skipped:
            say_skips(path, skipped, first)
        counts.update({f"skipped_{k}": v for k, v in skipped.items()})
    ids = np.full((len(rows), 2, limit), eos_id, np.int32)
    flags = np.zeros((len(rows), 2, limit), np.uint8)
    for k, row in enumerate(rows):
        for s, (side_ids, side_flags, _) in enumerate(row):
            ids[k, s, :len(side_ids)], flags[k, s, :len(side_flags)] = side_ids, side_flags
    report = {**dict(sorted(counts.items())), "pairs": len(rows), "overlong_rule": cfg.sft_overlong,
              "max_tokens": limit, "response_tokens": int(flags[:, :, 1:].sum())}
    return ids, flags, report


def preference_key(cfg) -> str:
    """Hash of what the prepared pairs depend on: the files (path, size, mtime), the tokenizer and chat
    template files, seq_len, the overlong and bad-record rules, the format version."""
    digest = hashlib.sha256(f"preference|{FORMAT_VERSION}|{cfg.seq_len}|{cfg.sft_overlong}|{cfg.on_bad_record}|"
                            f"{cfg.eos_token}".encode())
    for file, _ in corpus_files(cfg.path, "jsonl").files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    folder = Path(cfg.tokenizer).expanduser().parent
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).is_file():
            digest.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return digest.hexdigest()[:16]


def prepare_preference(cfg) -> PreparedData:
    """The prepared pairs of data.path (cached in data.cache_dir/<preference_key>; written atomically).
    Raises DataError (no tokenizer, no usable pair, bad records with on_bad_record=error)."""
    from ascend_llm.tokenizer.hf import HFTokenizer

    if not cfg.tokenizer or cfg.path is None:
        field, value = ("data.tokenizer", cfg.tokenizer) if not cfg.tokenizer else ("data.path", cfg.path)
        raise DataError(field, value, "preference tuning needs model.pretrained=DIR (its tokenizer) and "
                                      "data.path=PAIRS.jsonl")
    target = Path(cfg.cache_dir).expanduser() / preference_key(cfg)
    if (target / "meta.json").is_file():
        return PreparedData(target, json.loads((target / "meta.json").read_text()))
    try:
        tokenizer = HFTokenizer(Path(cfg.tokenizer).expanduser().parent)
    except UserInputError as exc:
        raise DataError("data.tokenizer", cfg.tokenizer, exc.one_line()) from None
    eos_token = cfg.eos_token or tokenizer.eos_token
    eos_id = tokenizer.tokenizer.token_to_id(eos_token) if eos_token else None
    if eos_id is None:
        raise DataError("data.eos_token", eos_token, "must be a token of the tokenizer (responses end with it)")
    ids, flags, report = encode_pairs(cfg, tokenizer, eos_id)
    if not len(ids):
        raise DataError("data.path", cfg.path, f"holds no usable preference pair ({json.dumps(report)})")

    def fill(tmp: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, ids=ids, flags=flags)
        (tmp / "pairs.npz").write_bytes(buffer.getvalue())
        meta = {"num_tokens": int(ids.size), "vocab_size": int(tokenizer.vocab_size), "eos_id": int(eos_id),
                "eos_token": eos_token, "num_docs": int(len(ids)), "source": str(cfg.path), "format": "preference",
                "tokenizer": cfg.tokenizer, "key": target.name, "format_version": FORMAT_VERSION, "report": report}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        tokenizer.tokenizer.save(str(tmp / "tokenizer.json"))

    write_dir_atomic(target, fill, field="data.cache_dir", keep_existing=True)
    return PreparedData(target, json.loads((target / "meta.json").read_text()))


class PreferenceDataset:
    """Pairs as the trainer's dataset: row ids [0, num_train) train, [num_train, num_train + num_val) held out
    (a seeded random val_fraction of the pairs, at least one when val_fraction > 0 and there are two or more).
    `reference` (N, 2) float32: cached reference log-probabilities (chosen, rejected) of each pair, or None."""

    def __init__(self, prepared: PreparedData, val_fraction: float, seed: int):
        with np.load(prepared.path / "pairs.npz") as arrays:
            ids, flags = arrays["ids"], arrays["flags"].astype(bool)
        n = len(ids)
        order = np.random.default_rng([seed, 0xD90]).permutation(n)
        num_val = min(max(int(round(val_fraction * n)), 1), n - 1) if val_fraction > 0 and n > 1 else 0
        keep = np.concatenate([np.sort(order[num_val:]), np.sort(order[:num_val])])
        self.ids, self.flags = ids[keep], flags[keep]
        self.pair_ids = keep  # row -> pair number in pairs.npz (the reference cache's order)
        self.num_train, self.num_val, self.seed = n - num_val, num_val, seed
        self.reference = None
        self._order = EpochOrder(self.seed, self.num_train)

    def arrays(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, labels) int32 (2 * len(rows), seq_len): the chosen rows, then the rejected rows; labels are the
        next token where it is a response token, else -100."""
        ids = np.concatenate([self.ids[rows, 0], self.ids[rows, 1]])
        flags = np.concatenate([self.flags[rows, 0], self.flags[rows, 1]])
        labels = np.where(flags[:, 1:], ids[:, 1:], -100).astype(np.int32)
        return np.ascontiguousarray(ids[:, :-1]), labels

    def reference_of(self, rows: np.ndarray) -> np.ndarray:
        """(2 * len(rows),) float32 cached reference log-probabilities in arrays()' order (zeros when none)."""
        if self.reference is None:
            return np.zeros(2 * len(rows), np.float32)
        pairs = self.pair_ids[rows]
        return np.concatenate([self.reference[pairs, 0], self.reference[pairs, 1]]).astype(np.float32)

    def train_indices(self, position: int, count: int) -> np.ndarray:
        """Row ids (count,) int64 for global positions [position, position + count): a seeded permutation per
        epoch (a pure function of (seed, position))."""
        return self._order.indices(position, count)

    def val_indices(self, count: int) -> np.ndarray:
        """`count` held-out rows; fewer held-out pairs than asked for are repeated in order (a small set still
        forms a validation micro-batch)."""
        return repeated_held_out(self.num_train, self.num_val, count)

    def describe_mix(self, position: int) -> dict:
        return {"data": {"weight": 1.0, "sequences": int(position), "share": 1.0}}

    def describe_split(self) -> dict:
        return {"train_pairs": self.num_train, "val_pairs": self.num_val,
                "response_tokens_per_pair": round(float(self.flags[:, :, 1:].sum()) / max(len(self.ids), 1), 2)}
