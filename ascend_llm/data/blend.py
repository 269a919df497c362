"""Blending several packed corpora by weight (Megatron's `--data-path 0.7 a 0.3 b`), behind the same sampler API.

Positions are dealt in blocks of BLOCK sequences: block b holds round(w_k * BLOCK) sequences of source k
(largest-remainder rounding, so the counts sum to BLOCK), in an order that is a seeded permutation of
(seed, b). The n-th sequence drawn from source k is that source's own train_indices(n, 1), so every source
runs through its own shuffled epochs. Everything is a pure function of (seed, position): resume is exact and
the realised mix over any whole number of blocks equals the rounded weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ascend_llm.config.data import DataConfig, parse_sources
from ascend_llm.data.dataset import PackedDataset
from ascend_llm.data.prepare import PreparedData

BLOCK = 1000


def block_counts(weights: Sequence[float], block: int) -> np.ndarray:
    """(num_sources,) int64 sequences per block: largest-remainder apportionment of weights * block."""
    exact = np.asarray(weights, np.float64) / np.sum(weights) * block
    counts = np.floor(exact).astype(np.int64)
    short = block - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class BlendedDataset:
    """Several PackedDatasets (one per source, same tokenizer and seq_len) sampled by weight.

    Window ids are global: source k owns [base_k, base_k + num_train_k + num_val_k), train ids first.
    Same interface as PackedDataset: num_train, train_indices, batch, val_indices.
    """

    def __init__(self, datasets: Sequence[PackedDataset], weights: Sequence[float], seed: int,
                 names: Sequence[str] | None = None, block: int = BLOCK):
        self.datasets, self.seed, self.block = list(datasets), seed, block
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.names = list(names) if names else [str(k) for k in range(len(datasets))]
        self.counts = block_counts(self.weights, block)
        sizes = [d.num_train + d.num_val for d in self.datasets]
        self.bases = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.num_train = int(sum(d.num_train for d in self.datasets))
        self.num_val = int(sum(d.num_val for d in self.datasets))
        self.seq_len = self.datasets[0].seq_len
        self._block_id, self._block = -1, (np.empty(0), np.empty(0))

    def _deal(self, block_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's draws in the block) for each slot of block `block_id`."""
        if block_id != self._block_id:
            sources = np.repeat(np.arange(len(self.counts)), self.counts)
            sources = sources[np.random.default_rng([self.seed, 0xB1E, block_id]).permutation(self.block)]
            ranks = np.empty(self.block, np.int64)
            for k in range(len(self.counts)):
                where = np.flatnonzero(sources == k)
                ranks[where] = np.arange(len(where))
            self._block_id, self._block = block_id, (sources, ranks)
        return self._block

    def sources_at(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, draw number within the source) (count,) int64 each, for positions [position, +count)."""
        sources, draws = np.empty(count, np.int64), np.empty(count, np.int64)
        for i in range(count):
            block_id, slot = divmod(position + i, self.block)
            block_sources, ranks = self._deal(block_id)
            k = int(block_sources[slot])
            sources[i], draws[i] = k, block_id * self.counts[k] + ranks[slot]
        return sources, draws

    def train_indices(self, position: int, count: int) -> np.ndarray:
        """Global window ids (count,) int64 for positions [position, position + count); pure in (seed, position)."""
        sources, draws = self.sources_at(position, count)
        return np.asarray([self.bases[k] + self.datasets[k].train_indices(int(n), 1)[0]
                           for k, n in zip(sources, draws)], np.int64)

    def _locate(self, index: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.bases, index, side="right")) - 1
        return k, int(index - self.bases[k])

    def batch(self, indices: np.ndarray, with_segments: bool = False):
        """As PackedDataset.batch, rows drawn from their sources."""
        parts = [self.datasets[k].batch(np.array([local]), with_segments)
                 for k, local in map(self._locate, (int(i) for i in indices))]
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(len(parts[0])))

    def val_indices(self, count: int) -> np.ndarray:
        """Each source's fixed validation sample, count split by weight (largest remainder)."""
        out = []
        for k, n in enumerate(block_counts(self.weights, count) if count else np.zeros(len(self.datasets), int)):
            dataset = self.datasets[k]
            out.append(self.bases[k] + dataset.val_indices(int(n)))
        return np.concatenate(out).astype(np.int64)

    def describe_split(self) -> dict:
        """Per source, PackedDataset.describe_split(); plus the totals."""
        per = {name: d.describe_split() for name, d in zip(self.names, self.datasets)}
        return {"train_tokens": sum(v["train_tokens"] for v in per.values()),
                "val_tokens": sum(v["val_tokens"] for v in per.values()),
                "train_windows": self.num_train, "val_windows": self.num_val, "sources": per}

    def describe_mix(self, position: int) -> dict:
        """Realised mix over the first `position` sequences: {name: {weight, sequences, share}}."""
        full, rest = divmod(position, self.block)
        drawn = self.counts * full
        if rest:
            drawn = drawn + np.bincount(self._deal(full)[0][:rest], minlength=len(self.counts))
        total = max(int(drawn.sum()), 1)
        return {name: {"weight": round(float(w), 4), "sequences": int(n), "share": round(int(n) / total, 4)}
                for name, w, n in zip(self.names, self.weights, drawn)}


def build_dataset(cfg: DataConfig, prepared: Sequence[PreparedData]) -> PackedDataset | BlendedDataset:
    """The trainer's dataset: one PackedDataset for data.path, a BlendedDataset over data.sources.

    prepared: prepare_sources(cfg) (same order as data.sources). Source k's own shuffling seed is
    cfg.seed + 7919 * k (so a single source keeps cfg.seed). data.format=sft: an SFTDataset (data/sft.py)."""
    if cfg.format == "sft":
        from ascend_llm.data.sft import SFTDataset

        return SFTDataset(prepared[0], cfg.seq_len, cfg.val_fraction, cfg.seed)
    datasets = [PackedDataset(p.tokens(), cfg.seq_len, cfg.val_fraction, cfg.seed + 7919 * k, p.doc_ends())
                for k, p in enumerate(prepared)]
    if not cfg.sources or len(datasets) == 1:
        return datasets[0]
    pairs = parse_sources(cfg.sources)
    return BlendedDataset(datasets, [w for w, _ in pairs], cfg.seed, names=[path for _, path in pairs])
