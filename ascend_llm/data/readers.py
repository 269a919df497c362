"""Per-suffix corpus readers: documents streamed as text pieces, with file:line errors or counted skips.

Kinds (chosen from the suffix, `.gz` read through gzip): text (.txt .md .py .rst; one file is one document,
streamed in pieces of about 1 MiB cut at line ends), jsonl (one JSON object per line, the text in
data.text_field), json (a JSON array of such objects or of strings; read whole, so memory ~ file size).

Defined behaviour for unusual input (the same in every kind):
- a UTF-8 byte-order mark at the start of a file is dropped;
- CRLF and lone CR line endings become LF;
- a literal special-token string (e.g. `<|endoftext|>`) is ordinary text here (the encoder keeps it so);
- empty or whitespace-only documents are skipped and counted under `empty`;
- undecodable bytes, invalid JSON, a record that is not an object, a missing or non-string text field:
  with on_bad_record="error" a DataError naming `file:line` (and the field); with "skip" the record
  (for text files: the line) is dropped and counted per file under its reason.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ascend_llm.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
KINDS = {**{s: "text" for s in TEXT_SUFFIXES}, ".jsonl": "jsonl", ".json": "json"}
ON_BAD_RECORD = ("error", "skip")
CHUNK_BYTES = 1 << 20
BOM = b"\xef\xbb\xbf"


@dataclass
class FileStats:
    """What one file contributed: documents kept, UTF-8 bytes of their text, records skipped by reason."""

    path: str
    kind: str
    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        """JSON-ready form for the prepare report (skip reasons sorted)."""
        return {"path": self.path, "kind": self.kind, "documents": self.documents, "bytes": self.bytes,
                "skipped": dict(sorted(self.skipped.items()))}


def file_kind(path: Path, fmt: str = "auto") -> str | None:
    """'text' | 'jsonl' | 'json' from the suffix (a trailing .gz is looked through); fmt other than auto wins."""
    if fmt != "auto":
        return "text" if fmt == "txt" else fmt
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return KINDS.get(suffixes[-1]) if suffixes else None


def open_binary(path: Path) -> BinaryIO:
    """`path` opened for reading bytes, through gzip when its suffix is .gz."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def normalize(text: str) -> str:
    """CRLF and lone CR -> LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


class _Reader:
    def __init__(self, path: Path, on_bad_record: str, stats: FileStats):
        self.path, self.on_bad, self.stats = path, on_bad_record, stats

    def bad(self, reason: str, where: str, value: object, allowed: str) -> None:
        """Raise (error mode) or count a skip (skip mode)."""
        if self.on_bad == "error":
            raise DataError(where, value, allowed + " (or set data.on_bad_record=skip to skip such records)")
        self.stats.skipped[reason] += 1

    def decode(self, raw: bytes, line: int) -> str | None:
        """`raw` as UTF-8 text, or None after reporting undecodable bytes: DataError naming file:line (counted from
        `line`) in error mode, a skip counted as `undecodable` in skip mode."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line += raw[:exc.start].count(b"\n")
            self.bad("undecodable", f"{self.path}:{line}", raw[max(0, exc.start - 8):exc.start + 8],
                     f"byte {raw[exc.start]:#04x} is not UTF-8; re-save the file as UTF-8")
            return None


class TextReader(_Reader):
    """A text file (.txt .md .py .rst): the whole file is one document, streamed in pieces of ~1 MiB."""

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """(text, ends_document) pieces of the file, ends_document True on the last one; leading whitespace is joined to
        the first text; an all-whitespace file yields nothing and counts as `empty`. DataError on undecodable bytes
        (error mode)."""
        line, lead, pending = 1, "", None
        for raw in self._raw_pieces():
            text = self._decode_lines(raw, line)
            line += raw.count(b"\n")
            if pending is None and not text.strip():
                lead += normalize(text)  # whitespace before the first text: held until text arrives
                continue
            if pending is not None:
                yield pending, False
            pending, lead = lead + normalize(text), ""
        if pending is None:
            self.stats.skipped["empty"] += 1
        else:
            yield pending, True

    def _raw_pieces(self) -> Iterator[bytes]:
        """The file's bytes in pieces of ~CHUNK_BYTES cut after a newline (or, in a 4 MiB run without one,
        before a UTF-8 lead byte), BOM removed."""
        carry, first = b"", True
        with open_binary(self.path) as handle:
            while True:
                block = handle.read(CHUNK_BYTES)
                if first and block.startswith(BOM):
                    block = block[len(BOM):]
                first = False
                data = carry + block
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if block and cut == 0:
                    if len(data) < 4 * CHUNK_BYTES:
                        carry = data
                        continue
                    cut = len(data) - 1
                    while cut > 0 and data[cut] & 0xC0 == 0x80:
                        cut -= 1
                raw, carry = data[:cut], data[cut:]
                if raw:
                    yield raw
                if not block:
                    return

    def _decode_lines(self, raw: bytes, line: int) -> str:
        """The piece as text; with undecodable bytes: an error naming the line, or the piece without its
        undecodable lines (each counted)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if self.on_bad == "error":
                self.decode(raw, line)
        parts = raw.split(b"\n")
        lines = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        kept = [self.decode(chunk, number) for number, chunk in enumerate(lines, line)]
        return "".join(piece for piece in kept if piece is not None)


class JsonlReader(_Reader):
    """A .jsonl file: one JSON object per line, its text in `text_field`; blank lines are skipped."""

    def __init__(self, path: Path, on_bad_record: str, stats: FileStats, text_field: str):
        super().__init__(path, on_bad_record, stats)
        self.text_field = text_field

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """(text, True) per record (one document each). Bad records raise DataError naming file:line (error mode) or are
        counted by reason (skip mode)."""
        with open_binary(self.path) as handle:
            for number, raw in enumerate(handle, 1):
                if number == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                line = self.decode(raw, number)
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    self.bad("invalid_json", f"{self.path}:{number}", line[:40].strip(), f"not valid JSON ({exc.msg})")
                    continue
                text = text_of(self, record, f"{self.path}:{number}")
                if text is not None:
                    yield text, True


class JsonArrayReader(JsonlReader):
    """A .json file holding one JSON array of objects (text in `text_field`) or of strings; read whole."""

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """(text, True) per array element. A file that is not a JSON array, or a bad element, raises DataError naming
        the file (and `[index]`) in error mode, or is counted by reason in skip mode."""
        with open_binary(self.path) as handle:
            raw = handle.read()
        if raw.startswith(BOM):
            raw = raw[len(BOM):]
        content = self.decode(raw, 1)
        if content is None:
            return
        try:
            records = json.loads(content)
        except json.JSONDecodeError as exc:
            self.bad("invalid_json", f"{self.path}:{exc.lineno}", content[exc.pos:exc.pos + 40].strip(),
                     f"not valid JSON ({exc.msg})")
            return
        if not isinstance(records, list):
            self.bad("not_array", str(self.path), type(records).__name__, "a .json corpus file must hold a JSON array")
            return
        for index, record in enumerate(records):
            text = record if isinstance(record, str) else text_of(self, record, f"{self.path}[{index}]")
            if text is not None:
                yield text, True


def text_of(reader: JsonlReader, record: object, where: str) -> str | None:
    """The record's text field, or None after reporting why it has none (error raises, skip counts)."""
    name = reader.text_field
    if not isinstance(record, dict):
        reader.bad("not_object", where, type(record).__name__, f"each record must be an object with a '{name}' field")
        return None
    if name not in record:
        reader.bad("missing_field", f"{where}.{name}", "missing",
                   f"each record must have a '{name}' field (data.text_field)")
        return None
    text = record[name]
    if not isinstance(text, str):
        reader.bad("non_string_text", f"{where}.{name}", text if not isinstance(text, (dict, list)) else
                   type(text).__name__, "the text field must be a JSON string")
        return None
    return normalize(text)


def read_pieces(path: Path, kind: str, on_bad_record: str, text_field: str,
                stats: FileStats) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of one file; updates stats (documents, bytes, skips) as it goes."""
    if kind == "text":
        reader = TextReader(path, on_bad_record, stats)
    elif kind == "jsonl":
        reader = JsonlReader(path, on_bad_record, stats, text_field)
    else:
        reader = JsonArrayReader(path, on_bad_record, stats, text_field)
    for text, ends in reader.pieces():
        if ends and kind != "text" and not text.strip():
            stats.skipped["empty"] += 1
            continue
        stats.bytes += len(text.encode("utf-8"))
        stats.documents += ends
        yield text, ends
