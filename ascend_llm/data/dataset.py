"""Packed fixed-length windows over the token stream: train/validation split, seeded shuffling, rank sharding.

Window i covers tokens [i*seq_len, i*seq_len + seq_len] (seq_len + 1 ids: inputs and shifted labels), so
every token is a target once. The last `val_fraction` of windows (at least one) is held out for validation.
The sampler is a pure function of (seed, position): resuming at a position reproduces the same batches.
"""

from __future__ import annotations

import numpy as np

from ascend_llm.errors import DataError


class PackedDataset:
    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        num_windows = (len(tokens) - 1) // seq_len
        num_val = int(num_windows * val_fraction)
        if val_fraction > 0:
            num_val = max(1, num_val)
        self.num_train = num_windows - num_val
        self.num_val = num_val
        if self.num_train < 1:
            raise DataError("data.seq_len", seq_len,
                            f"corpus has {len(tokens)} tokens: too few for one training window of seq_len+1")
        self._epoch, self._order = -1, np.empty(0, np.int64)

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
        return self._order

    def train_indices(self, position: int, count: int) -> np.ndarray:
        """Window ids for the `count` sequences starting at global position `position` (crosses epochs)."""
        out = np.empty(count, np.int64)
        for i in range(count):
            epoch, offset = divmod(position + i, self.num_train)
            out[i] = self._epoch_order(epoch)[offset]
        return out

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.stack([self.window(int(i)) for i in indices])
        return rows[:, :-1], rows[:, 1:]

    def val_indices(self, count: int) -> np.ndarray:
        """The first `count` validation windows (fixed, so validation losses are comparable across steps)."""
        count = min(count, self.num_val)
        return np.arange(self.num_train, self.num_train + count)


def shard_rows(indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank r's contiguous slice of a global batch; equal shards, so DP equals one process on the full batch."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank:(rank + 1) * per_rank]
