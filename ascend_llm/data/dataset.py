"""Packed fixed-length windows over the token stream: a document-level validation split, seeded shuffling,
rank sharding, and segment ids for document-aware attention.

Held-out units: each document, cut into pieces of at most `unit_windows * seq_len` tokens when it is longer
(a corpus that is one long book still gets a spread-out validation set). Units are taken for validation in
the order of a seeded random key until they hold `val_fraction` of the tokens (at least one window), so the
held-out text is drawn from the whole corpus, not its tail. The training stream is the remaining units in
corpus order; window i of a split covers its tokens [i*seq_len, i*seq_len + seq_len] (seq_len + 1 ids:
inputs and shifted labels). The sampler is a pure function of (seed, position): resuming reproduces batches.

Segment ids (document masking): a token's segment is its document; a document's EOS separator belongs to
that document, so the last text token still learns to predict EOS. Where a window's next token lies in
another segment (the EOS -> next document's first token, or a jump between non-adjacent held-out pieces),
the label is IGNORE_INDEX, so no loss is taken across a document boundary (Megatron's eod_mask_loss).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ascend_llm.errors import DataError

IGNORE_INDEX = -100  # ops.cross_entropy's default ignore_index


def _units(num_tokens: int, doc_ends: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 of documents cut into pieces of at most max_len tokens (ends exclusive)."""
    bounds = np.asarray(doc_ends, np.int64) + 1
    bounds = bounds[(bounds > 0) & (bounds <= num_tokens)]
    if not len(bounds) or bounds[-1] < num_tokens:
        bounds = np.append(bounds, num_tokens)
    doc_starts = np.concatenate([[0], bounds[:-1]])
    counts = -(-(bounds - doc_starts) // max_len)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    starts = np.repeat(doc_starts, counts) + (np.arange(counts.sum()) - first) * max_len
    ends = np.minimum(starts + max_len, np.repeat(bounds, counts))
    return starts, ends


class _Split:
    """Units of one split in corpus order, seen as one virtual token stream."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        self.starts, self.ends = starts, ends
        self.cum = np.cumsum(ends - starts)
        self.num_tokens = int(self.cum[-1]) if len(self.cum) else 0

    def pieces(self, begin: int, end: int):
        """(unit, stream_start, stream_end) for virtual positions [begin, end)."""
        first = int(np.searchsorted(self.cum, begin, side="right"))
        position = begin
        for unit in range(first, len(self.cum)):
            if position >= end:
                break
            unit_begin = int(self.cum[unit] - (self.ends[unit] - self.starts[unit]))
            offset = position - unit_begin
            take = min(end - position, int(self.ends[unit] - self.starts[unit]) - offset)
            yield unit, int(self.starts[unit]) + offset, int(self.starts[unit]) + offset + take
            position += take


class EpochOrder:
    """The training order over `num_train` rows: a seeded permutation per epoch (NumPy's default_rng seeded with
    [seed, epoch]); global position p reads row permutation(p // num_train)[p % num_train], so the order is a
    pure function of (seed, position) and resume needs only the position. The current epoch's permutation is
    kept (positions advance in order)."""

    def __init__(self, seed: int, num_train: int):
        self.seed, self.num_train = seed, int(num_train)
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def indices(self, position: int, count: int) -> np.ndarray:
        """Row ids (count,) int64 for global positions [position, position + count) (crosses epochs)."""
        out = np.empty(count, np.int64)
        for i in range(count):
            epoch, offset = divmod(position + i, self.num_train)
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
            out[i] = self._order[offset]
        return out


def repeated_held_out(num_train: int, num_val: int, count: int) -> np.ndarray:
    """Row ids (count,) int64 of held-out rows [num_train, num_train + num_val) in order; when there are fewer than
    `count` (a small set) they repeat, so one validation micro-batch can still be formed (each row then weighs its
    number of repeats). No held-out rows: an empty array."""
    if 0 < num_val < count:
        return num_train + np.arange(count, dtype=np.int64) % num_val
    return num_train + np.arange(min(count, num_val), dtype=np.int64)


class PackedDataset:
    """Windows of seq_len + 1 token ids over tokens (N,) uint16/uint32, split by documents (see module doc).

    doc_ends: (num_docs,) int64 positions of the EOS ending each document (PreparedData.doc_ends()); None
    treats the stream as one document. Window ids: [0, num_train) train, [num_train, num_train + num_val) val.
    Raises DataError when the corpus is too small for one training window.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int,
                 doc_ends: Optional[np.ndarray] = None, unit_windows: int = 16):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.doc_ends = np.asarray(doc_ends if doc_ends is not None else [], np.int64)
        starts, ends = _units(len(tokens), self.doc_ends, unit_windows * seq_len)
        is_val = np.zeros(len(starts), bool)
        if val_fraction > 0 and len(starts) > 1:
            order = np.random.default_rng([seed, 0x5A17]).permutation(len(starts))
            need = max(val_fraction * len(tokens), seq_len + 1)
            taken = np.cumsum((ends - starts)[order])
            is_val[order[:int(np.searchsorted(taken, need)) + 1]] = True
        self.train_split = _Split(starts[~is_val], ends[~is_val])
        self.val_split = _Split(starts[is_val], ends[is_val])
        self.num_train = max(0, (self.train_split.num_tokens - 1) // seq_len)
        self.num_val = max(0, (self.val_split.num_tokens - 1) // seq_len)
        if self.num_train < 1:
            raise DataError("data.seq_len", seq_len, f"corpus has {len(tokens)} tokens ({self.val_split.num_tokens} "
                            "held out): too few for one training window of seq_len+1")
        self._order = EpochOrder(seed, self.num_train)

    def _split_of(self, index: int) -> tuple[_Split, int]:
        return (self.train_split, index) if index < self.num_train else (self.val_split, index - self.num_train)

    def window(self, index: int, with_segments: bool = False):
        """Token ids (seq_len + 1,) int32 of window `index`; with_segments also its segment ids (seq_len + 1,)
        int32, numbered from 0 at the window's first token."""
        split, local = self._split_of(index)
        begin = local * self.seq_len
        parts = list(split.pieces(begin, begin + self.seq_len + 1))
        ids = np.concatenate([np.asarray(self.tokens[a:b], dtype=np.int32) for _, a, b in parts])
        if not with_segments:
            return ids
        keys = []
        for unit, a, b in parts:
            docs = np.searchsorted(self.doc_ends, np.arange(a, b), side="left")
            keys.append(np.stack([np.full(b - a, unit), docs], axis=1))
        key = np.concatenate(keys)
        change = np.any(key[1:] != key[:-1], axis=1)
        return ids, np.concatenate([[0], np.cumsum(change)]).astype(np.int32)

    def train_indices(self, position: int, count: int) -> np.ndarray:
        """Window ids (count,) int64 for the sequences at global positions [position, position + count)
        (crosses epochs; a pure function of (seed, position))."""
        return self._order.indices(position, count)

    def batch(self, indices: np.ndarray, with_segments: bool = False):
        """(x, y) int32 (B, seq_len): inputs and next-token labels. with_segments=True: (x, y, segment_ids),
        segment_ids (B, seq_len) int32, and y is IGNORE_INDEX where the label lies in another segment."""
        if not with_segments:
            rows = np.stack([self.window(int(i)) for i in indices])
            return rows[:, :-1], rows[:, 1:]
        pairs = [self.window(int(i), True) for i in indices]
        rows, segs = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        labels = rows[:, 1:].copy()
        labels[segs[:, 1:] != segs[:, :-1]] = IGNORE_INDEX
        return rows[:, :-1], labels, segs[:, :-1].copy()

    def val_indices(self, count: int) -> np.ndarray:
        """A fixed seeded sample of `count` validation windows (the same at every step, so losses compare)."""
        count = min(count, self.num_val)
        sample = np.random.default_rng([self.seed, 0x7A1]).permutation(self.num_val)[:count]
        return self.num_train + np.sort(sample)

    def describe_mix(self, position: int) -> dict:
        """One source: all `position` sequences come from it (the BlendedDataset interface)."""
        return {"data": {"weight": 1.0, "sequences": int(position), "share": 1.0}}

    def describe_split(self) -> dict:
        """Token and unit counts of the split, and where the held-out units lie (fractions of the corpus)."""
        starts = self.val_split.starts / max(len(self.tokens), 1)
        return {"train_tokens": self.train_split.num_tokens, "val_tokens": self.val_split.num_tokens,
                "train_windows": self.num_train, "val_windows": self.num_val, "val_units": len(starts),
                "val_units_first_last": [round(float(starts.min()), 4), round(float(starts.max()), 4)]
                if len(starts) else None}


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Position ids restarting at 0 where each segment starts (Megatron's reset_position_ids).

    segment_ids (B, S) int -> (B, S) int32; e.g. [0 0 0 1 1 2] -> [0 1 2 0 1 0]."""
    segment_ids = np.asarray(segment_ids)
    index = np.broadcast_to(np.arange(segment_ids.shape[-1]), segment_ids.shape)
    starts = np.concatenate([np.ones_like(segment_ids[..., :1], bool),
                             segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return (index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)).astype(np.int32)


def shard_rows(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank r's contiguous slice of a global batch; equal shards, so DP equals one process on the full batch."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank:(rank + 1) * per_rank]
