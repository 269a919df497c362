"""Static block plan of segmented attention: which (query block, key block) pairs to visit, and which need a mask.

Pure NumPy on Python ints (shapes are static in a graph-mode trace), tested on their own. Causal masking is
bottom-right aligned: query i sees key j when j <= i + seq_k - seq_q. Rows and keys past the sequence ends
(the last block padded up to the block size) are never counted as visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def num_blocks(seq: int, block: int) -> int:
    """ceil(seq / block): blocks covering `seq` positions, the last one possibly padded."""
    return -(-seq // block)


def visible_blocks(seq_q: int, seq_k: int, block_q: int, block_k: int, causal: bool) -> np.ndarray:
    """Bool (num_q_blocks, num_k_blocks): True where the pair holds at least one visible (query, key) pair."""
    nq, nk = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    if not causal:
        return np.ones((nq, nk), dtype=bool)
    last_row = np.minimum((np.arange(nq) + 1) * block_q, seq_q) - 1
    first_key = np.arange(nk) * block_k
    return first_key[None, :] <= last_row[:, None] + (seq_k - seq_q)


def masked_blocks(seq_q: int, seq_k: int, block_q: int, block_k: int, causal: bool) -> np.ndarray:
    """Bool (num_q_blocks, num_k_blocks): True where some (real query, key) pair of the block is hidden, so the
    block needs a mask: causal blocks crossing the diagonal, and a last key block padded up to the block size."""
    nq, nk = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    masked = np.zeros((nq, nk), dtype=bool)
    if causal:
        first_row = np.arange(nq) * block_q
        last_key = (np.arange(nk) + 1) * block_k - 1  # padding keys count: they are hidden from every real row
        masked = last_key[None, :] > first_row[:, None] + (seq_k - seq_q)
    if nk * block_k != seq_k:
        masked[:, -1] = True
    return masked


def _split_ranges(visible: np.ndarray, masked: np.ndarray, masked_first: bool):
    """Per row of `visible`: [lo, hi) spanning its visible columns and the split point mid, so that the masked
    columns are [mid, hi) (or [lo, mid) when masked_first) and the rest of [lo, hi) needs no mask."""
    rows, cols = visible.shape
    lo = np.zeros(rows, np.int32)
    mid = np.zeros(rows, np.int32)
    hi = np.zeros(rows, np.int32)
    for r in range(rows):
        seen = np.flatnonzero(visible[r])
        if seen.size == 0:
            continue
        lo[r], hi[r] = seen[0], seen[-1] + 1
        span = masked[r, lo[r]:hi[r]]
        if masked_first:
            plain = np.flatnonzero(~span)
            mid[r] = lo[r] + (plain[0] if plain.size else span.size)
            ok = span[: mid[r] - lo[r]].all() and not span[mid[r] - lo[r]:].any()
        else:
            hidden = np.flatnonzero(span)
            mid[r] = lo[r] + (hidden[0] if hidden.size else span.size)
            ok = not span[: mid[r] - lo[r]].any() and span[mid[r] - lo[r]:].all()
        if not ok:
            raise AssertionError(f"block plan: masked blocks of row {r} are not contiguous: {span.astype(int)}")
    return lo, mid, hi


@dataclass
class BlockPlan:
    """Loop ranges. Forward, per query block i: key blocks [k_lo, k_mid) unmasked, then [k_mid, k_hi) masked.
    Backward, per key block j: query blocks [q_lo, q_mid) masked, then [q_mid, q_hi) unmasked."""

    visible: np.ndarray
    masked: np.ndarray
    k_lo: np.ndarray
    k_mid: np.ndarray
    k_hi: np.ndarray
    q_lo: np.ndarray
    q_mid: np.ndarray
    q_hi: np.ndarray

    @property
    def num_pairs(self) -> int:
        """Number of (query block, key block) pairs the forward visits."""
        return int((self.k_hi - self.k_lo).sum())

    @property
    def num_masked_pairs(self) -> int:
        """Number of visited pairs that need a mask (causal diagonal or padded last key block)."""
        return int((self.k_hi - self.k_mid).sum())


def block_plan(seq_q: int, seq_k: int, block_q: int, block_k: int, causal: bool) -> BlockPlan:
    """The loop plan of segmented attention for these static sizes: visible and masked pairs, and per-row and
    per-column ranges (see BlockPlan). Raises AssertionError if a row's masked blocks are not contiguous (a bug)."""
    visible = visible_blocks(seq_q, seq_k, block_q, block_k, causal)
    masked = masked_blocks(seq_q, seq_k, block_q, block_k, causal) & visible
    k_lo, k_mid, k_hi = _split_ranges(visible, masked, masked_first=False)
    q_lo, q_mid, q_hi = _split_ranges(visible.T, masked.T, masked_first=True)
    return BlockPlan(visible, masked, k_lo, k_mid, k_hi, q_lo, q_mid, q_hi)


def attention_flops(batch: int, num_heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    backward: bool = True) -> float:
    """FLOPs of attention by FlashAttention's count: 4*B*H*Sq*Sk*D for the forward (two matmuls), halved when
    causal (Sq == Sk). With `backward` the total of forward and backward, 3.5x the forward (the backward counts
    2.5x: 5 matmuls to the forward's 2, FlashAttention-2's benchmark convention)."""
    flops = 4.0 * batch * num_heads * seq_q * seq_k * head_dim
    if causal:
        flops /= 2
    return flops * (3.5 if backward else 1.0)
