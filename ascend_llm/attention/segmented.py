"""Segmented attention: exact blockwise attention with O(N) memory and a FlashAttention-2 backward.

Forward: query blocks x key/value segments with an online softmax (running max m and running sum l per row).
Only block pairs that can hold a visible (query, key) pair are visited (causal skipping; for packed documents
also pairs whose segment-id ranges cannot meet), and only pairs crossing a mask boundary pay for a mask.
Backward (custom `bprop`): save O and the log-sum-exp, recompute each pair's probabilities, D = rowsum(dO * O),
accumulate dK/dV per key block and dQ per query block. No seq_q x seq_k tensor exists in either direction:
the largest temporaries are one block pair of scores.

Graph-mode notes. Loops are `ops.WhileLoop` (compiled once, however many blocks); bodies take every tensor
through the loop state. Per-block results go into buffers with `ops.index_add`, which writes in place (a
functional scatter would copy the whole buffer every step; see `_fresh_buffers_note`). Row sums and the
subtractions of the backward are folded into the matmuls by one extra column: P @ [V, 1] gives P V and
rowsum(P); [Q, -lse] @ [K, 1]^T gives S - lse; [dO, -D] @ [V, 1]^T gives dP - D.

Kernel layout: query heads are grouped by their key/value head (GQA without repeating K/V), so a query block
is (batch, num_kv_heads, group * block_q, head_dim) and stacked blocks carry a leading block axis.

One block pair (seq_q <= block_q and seq_k <= block_k, so every sequence up to the 512-token default block): the
same arithmetic without the loops (`one_block.py`), bit for bit the loops' result in a graph that compiles faster.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.attention.blocks import block_plan, num_blocks
from ascend_llm.attention.masks import KEY_PAD, QUERY_PAD, segment_codes
from ascend_llm.attention.one_block import EMPTY_ROW_LSE, NEG_START, OneBlockPath

AUTO_BLOCK = 512  # see auto_block_size
INT_BIG = 2**31 - 1


def auto_block_size(seq: int) -> int:
    """Block size for a sequence of `seq` tokens when the caller gives none: the whole sequence as one block up
    to AUTO_BLOCK tokens, AUTO_BLOCK beyond.

    Measured on a 2-core x86 CPU, causal fp32 forward+backward, blocks compared in one process, interleaved
    (CPU seconds, median; scripts/bench_attention.py runs the full table): B=8 H=8 D=32 N=256: one block 0.70x
    naive, 128: 0.80x, 64: 0.85x; N=512: one block 0.52x, 256: 0.48x, 128: 0.51x (within the noise of a shared
    machine). B=8 H=8 D=64 N=1024: 256 and 512 0.40-0.44x naive, 1024: 0.53x. B=1 H=8
    D=64: N=2048: 256 1.26x, 1024 1.17x, 2048 1.41x the time of 512; N=8192: 256 1.40x, 1024 1.00x of 512.
    Smaller blocks pay a fixed cost per loop step (about 16 kernel launches); larger ones compute more of the
    masked diagonal blocks (about block/2 wasted keys per row).
    """
    return min(seq, AUTO_BLOCK)


def _device_ranges(visible: Tensor, cols: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """[lo, hi) of the nonzero columns of each row of an int32 0/1 matrix (cols: 0..size-1 as (1, size));
    empty rows get lo = hi."""
    hi = (visible * (cols + 1)).max(axis=1)
    lo = ops.minimum((visible * cols + (1 - visible) * size).min(axis=1), hi)
    return lo, hi


class SegmentedAttention(OneBlockPath, nn.Cell):
    """One attention call of fixed shapes and options. Returns float32 (batch, num_heads, seq_q, head_dim + 1):
    the output rows with the log-sum-exp appended as the last column (a tuple output breaks MindSpore's
    autodiff around a custom bprop in graph mode).

    Built inside the caller's trace, where shapes are static, so the loop plan is a compile-time constant.
    `q_seg` (batch, seq_q) and `k_seg` (batch, seq_k) are int32 segment codes (query i sees key j only when
    they are equal) when `has_segments`, else ignored placeholders.
    """

    def __init__(self, q_shape: tuple, kv_shape: tuple, causal: bool, scale: float, block_q: int | None,
                 block_k: int | None, has_segments: bool):
        super().__init__()
        self.batch, self.num_heads, self.seq_q, self.head_dim = q_shape
        self.num_kv_heads, self.seq_k = kv_shape[1], kv_shape[2]
        self.group = self.num_heads // self.num_kv_heads
        # Auto sizes are resolved here, not in segmented_attention: this constructor runs as plain Python inside
        # the caller's trace, while a helper call in the traced function itself crashes MindSpore 2.10's parser.
        block_q = auto_block_size(self.seq_q) if block_q is None else block_q
        block_k = auto_block_size(self.seq_k) if block_k is None else block_k
        self.block_q, self.block_k = min(block_q, self.seq_q), min(block_k, self.seq_k)
        self.nq, self.nk = num_blocks(self.seq_q, self.block_q), num_blocks(self.seq_k, self.block_k)
        self.rows = self.group * self.block_q
        self.causal, self.scale, self.has_segments = causal, float(scale), has_segments
        self.offset = self.seq_k - self.seq_q
        plan = block_plan(self.seq_q, self.seq_k, self.block_q, self.block_k, causal)
        self.visible = Tensor(plan.visible.astype(np.int32))
        self.any_plain = not has_segments and bool((plan.k_mid > plan.k_lo).any())
        self.any_masked = has_segments or bool(plan.masked.any())
        self.pair_bias = self._constant_bias(plan)
        # Constants instead of ops.arange/ops.full: MindSpore functions with keyword-only arguments break
        # ("func graph is empty") when both construct and bprop use them.
        self.q_arange = Tensor(np.arange(self.block_q, dtype=np.int32).reshape(self.block_q, 1))
        self.k_arange = Tensor(np.arange(self.block_k, dtype=np.int32).reshape(1, self.block_k))
        self.range_q = Tensor(np.arange(self.nq, dtype=np.int32).reshape(1, self.nq))
        self.range_k = Tensor(np.arange(self.nk, dtype=np.int32).reshape(1, self.nk))
        self.fwd_ranges = tuple(Tensor(x) for x in (plan.k_lo, plan.k_mid, plan.k_hi))
        self.bwd_ranges = tuple(Tensor(x) for x in (plan.q_lo, plan.q_mid, plan.q_hi))
        self.scores_nt = ops.BatchMatMul(transpose_b=True)
        self.grads_tn = ops.BatchMatMul(transpose_a=True)
        self.while_loop = ops.WhileLoop()
        # one block pair (seq_q <= block_q, seq_k <= block_k): the loops' arithmetic without the loops (one_block.py)
        self.one_block = self.nq == 1 and self.nk == 1
        self._one_block_constants(causal)

    # ----- layout -----
    # Tensors stay in their natural order; a block is a view axis, read with ops.gather and written with
    # ops.index_add: (B, H, S, C) is viewed as (B, Hkv, G, n, b, C) and (B, Hkv, S, C) as (B, Hkv, n, b, C).

    def _q_view(self, x):
        """(B, H, Sq, C) -> float32 (B, Hkv, G, nq, bq, C), rows past seq_q zero."""
        b, c = self.batch, x.shape[-1]
        x = x.astype(mstype.float32)
        pad = self.nq * self.block_q - self.seq_q
        if pad:
            x = ops.concat((x, ops.zeros((b, self.num_heads, pad, c), mstype.float32)), 2)
        return x.reshape(b, self.num_kv_heads, self.group, self.nq, self.block_q, c)

    def _kv_view(self, x):
        """(B, Hkv, Sk, C) -> float32 (B, Hkv, nk, bk, C), keys past seq_k zero."""
        c = x.shape[-1]
        x = x.astype(mstype.float32)
        pad = self.nk * self.block_k - self.seq_k
        if pad:
            x = ops.concat((x, ops.zeros((self.batch, self.num_kv_heads, pad, c), mstype.float32)), 2)
        return x.reshape(self.batch, self.num_kv_heads, self.nk, self.block_k, c)

    def _q_block(self, x, i):
        """Query block i of a (B, Hkv, G, nq, bq, C) view as (B, Hkv, G*bq, C)."""
        return ops.gather(x, i, 3).reshape(self.batch, self.num_kv_heads, self.rows, x.shape[-1])

    def _add_q_block(self, buffer, i, block):
        """buffer[:, :, :, i] += block (B, Hkv, G*bq, C), in place."""
        block = block.reshape(self.batch, self.num_kv_heads, self.group, 1, self.block_q, block.shape[-1])
        return ops.index_add(buffer, i.reshape(1), block, 3, False, False)

    def _with_column(self, x, column):
        """Append one column: `column` is a float or a tensor of x's shape without the last axis."""
        if isinstance(column, float):
            column = ops.ones(x.shape[:-1] + (1,), mstype.float32) * column
        else:
            column = column.astype(mstype.float32).expand_dims(-1)
        return ops.concat((x.astype(mstype.float32), column), -1)

    # ----- masks -----

    def _segment_view(self, q_seg, k_seg):
        """Segment codes (B, nq, bq) and (B, nk, bk); rows and keys past the ends coded as padding."""
        q_seg = q_seg.astype(mstype.int32)
        k_seg = k_seg.astype(mstype.int32)
        q_pad = self.nq * self.block_q - self.seq_q
        k_pad = self.nk * self.block_k - self.seq_k
        if q_pad:
            q_seg = ops.concat((q_seg, ops.ones((self.batch, q_pad), mstype.int32) * QUERY_PAD), 1)
        if k_pad:
            k_seg = ops.concat((k_seg, ops.ones((self.batch, k_pad), mstype.int32) * KEY_PAD), 1)
        return q_seg.reshape(self.batch, self.nq, self.block_q), k_seg.reshape(self.batch, self.nk, self.block_k)

    def _segments(self, q_seg, k_seg):
        if self.has_segments:
            return self._segment_view(q_seg, k_seg)
        return ops.zeros((1, self.nq, 1), mstype.int32), ops.zeros((1, self.nk, 1), mstype.int32)

    def _ranges(self, q_segs, k_segs):
        """Loop ranges (lo, mid, hi) forward (per query block) and backward (per key block). With segments,
        pairs whose segment-id ranges cannot meet are cut from the ends of each range, and every pair is masked."""
        if not self.has_segments:
            return self.fwd_ranges, self.bwd_ranges
        q_real = q_segs != QUERY_PAD
        k_real = k_segs != KEY_PAD
        q_min = ops.where(q_real, q_segs, INT_BIG).min(axis=2).transpose(1, 0)  # (nq, B)
        q_max = ops.where(q_real, q_segs, -INT_BIG).max(axis=2).transpose(1, 0)
        k_min = ops.where(k_real, k_segs, INT_BIG).min(axis=2).transpose(1, 0)  # (nk, B)
        k_max = ops.where(k_real, k_segs, -INT_BIG).max(axis=2).transpose(1, 0)
        meet = (q_min.expand_dims(1) <= k_max.expand_dims(0)) & (k_min.expand_dims(0) <= q_max.expand_dims(1))
        visible = meet.any(axis=2).astype(mstype.int32) * self.visible  # (nq, nk)
        k_lo, k_hi = _device_ranges(visible, self.range_k, self.nk)
        q_lo, q_hi = _device_ranges(visible.transpose(1, 0), self.range_q, self.nq)
        return (k_lo, k_lo, k_hi), (q_lo, q_hi, q_hi)

    def _constant_bias(self, plan) -> Tensor | None:
        """(1, 1, G*bq, bk) float32 0/-inf: the mask every masked block pair shares when they all share one (the
        causal diagonal with bq == bk, or the padded last key block without causal), else None."""
        pairs = np.argwhere(plan.masked)
        if self.has_segments or not len(pairs):
            return None
        bq, bk = self.block_q, self.block_k
        shifts = {int(i * bq + self.offset - j * bk) if self.causal else 0 for i, j in pairs}
        if len(shifts) != 1:
            return None
        i, j = pairs[0]
        keys = np.arange(bk)[None, :] + j * bk
        if self.causal:
            keep = keys <= np.arange(bq)[:, None] + (i * bq + self.offset)
        else:
            keep = np.broadcast_to(keys < self.seq_k, (bq, bk))
        bias = np.where(keep, 0.0, -np.inf).astype(np.float32)
        return Tensor(np.tile(bias, (self.group, 1)).reshape(1, 1, self.rows, bk))

    def _bias(self, i, j, q_seg_block, k_seg_block):
        """Additive mask (0 or -inf) of block pair (i, j) at the full score shape (B, Hkv, G*bq, bk): built small,
        then tiled (see _same_shape_note)."""
        if self.pair_bias is not None:
            return ops.tile(self.pair_bias, (self.batch, self.num_kv_heads, 1, 1))
        bq, bk = self.block_q, self.block_k
        keep = None
        if self.causal:
            keep = self.k_arange + j * bk <= self.q_arange + (i * bq + self.offset)
        elif self.nk * bk != self.seq_k:
            keep = ops.broadcast_to(self.k_arange + j * bk < self.seq_k, (bq, bk))
        batch = 1
        if self.has_segments:
            same = q_seg_block.expand_dims(2) == k_seg_block.expand_dims(1)  # (B, bq, bk)
            keep = same if keep is None else same & keep
            batch = self.batch
        bias = ops.where(keep, 0.0, float("-inf")).astype(mstype.float32).reshape(batch, 1, bq, bk)
        if self.group > 1:
            bias = ops.tile(bias, (1, self.group, 1, 1)).reshape(batch, 1, self.rows, bk)
        return ops.tile(bias, (self.batch // batch, self.num_kv_heads, 1, 1))

    # ----- forward -----
    # _same_shape_note: MindSpore's CPU elementwise kernels are several times slower when an operand is
    # broadcast (s - m with m of shape (..., rows, 1): 2-5x the time of a same-shape subtract, measured at
    # (1, 8, 512, 512)), while ops.tile is a cheap copy. So every elementwise op on a block of scores gets
    # operands of the full score shape.
    # _fresh_buffers_note: `ops.index_add` writes into its buffer in place. Each buffer must therefore be a
    # runtime value that no other node shares: graph-mode CSE merges identical expressions (two `x * 0.0` of
    # the same x, or two zero constants of one shape, become one tensor) and a constant is reused across calls.
    # So each loop nest builds its buffer from its own inputs with an expression no other buffer uses
    # (forward: [Q, 0] * 0; backward: [dO, -D] * 0 and concat(K, V) * 0). Identical loop nests on
    # identical inputs are merged whole by CSE, which is still correct.

    def _fwd_cond(self, c):
        return c[0] < c[1]

    def _fwd_step(self, c, masked: bool):
        j, hi, i, q_block, k, v, q_seg_block, k_segs, m, acc = c
        s = self.scores_nt(q_block, ops.gather(k, j, 2))
        if masked:
            s = s + self._bias(i, j, q_seg_block, ops.gather(k_segs, j, 1))
        m_new = ops.maximum(m, s.max(axis=-1, keepdims=True))
        p = ops.exp(s - ops.tile(m_new, (1, 1, 1, self.block_k)))  # see _same_shape_note
        alpha = ops.tile(ops.exp(m - m_new), (1, 1, 1, self.head_dim + 1))
        acc = alpha * acc + ops.matmul(p, ops.gather(v, j, 2))  # v is [V, 1]: last column sums p
        return j + 1, hi, i, q_block, k, v, q_seg_block, k_segs, m_new, acc

    def _fwd_plain(self, c):
        return self._fwd_step(c, False)

    def _fwd_masked(self, c):
        return self._fwd_step(c, True)

    def _fwd_outer_cond(self, c):
        return c[0] < self.nq

    def _fwd_outer_body(self, c):
        i, q, k, v, q_segs, k_segs, k_lo, k_mid, k_hi, out = c
        q_block = self._q_block(q, i) * self.scale
        m = ops.ones((self.batch, self.num_kv_heads, self.rows, 1), mstype.float32) * NEG_START
        acc = ops.zeros((self.batch, self.num_kv_heads, self.rows, self.head_dim + 1), mstype.float32)
        mid = ops.gather(k_mid, i, 0)
        state = (ops.gather(k_lo, i, 0), mid, i, q_block, k, v, ops.gather(q_segs, i, 1), k_segs, m, acc)
        if self.any_plain:
            state = self.while_loop(self._fwd_cond, self._fwd_plain, state)
        if self.any_masked:
            state = (mid, ops.gather(k_hi, i, 0)) + state[2:]
            state = self.while_loop(self._fwd_cond, self._fwd_masked, state)
        m, acc = state[8], state[9]
        lsum = acc[..., self.head_dim:]
        seen = lsum > 0
        safe = ops.where(seen, lsum, 1.0)
        block = ops.concat((acc[..., : self.head_dim] / safe, ops.where(seen, m + ops.log(safe), float("-inf"))), -1)
        out = self._add_q_block(out, i, block)
        return i + 1, q, k, v, q_segs, k_segs, k_lo, k_mid, k_hi, out

    def construct(self, q, k, v, q_seg, k_seg):
        """q (B, H, Sq, D), k and v (B, H_kv, Sk, D), q_seg (B, Sq) / k_seg (B, Sk) int32 codes (placeholders without
        segments) -> float32 (B, H, Sq, D + 1): output rows and, in the last column, the log-sum-exp (-inf: no key)."""
        if self.one_block:
            return self._one_block_forward(q, k, v, q_seg, k_seg)
        q6 = self._q_view(q)
        k5 = self._kv_view(k)
        v5 = self._kv_view(self._with_column(v, 1.0))
        q_segs, k_segs = self._segments(q_seg, k_seg)
        (k_lo, k_mid, k_hi), _ = self._ranges(q_segs, k_segs)
        out = self._q_view(self._with_column(q, 0.0) * 0.0)  # see _fresh_buffers_note
        state = (ops.zeros((), mstype.int32), q6, k5, v5, q_segs, k_segs, k_lo, k_mid, k_hi, out)
        state = self.while_loop(self._fwd_outer_cond, self._fwd_outer_body, state)
        out = state[9].reshape(self.batch, self.num_heads, self.nq * self.block_q, self.head_dim + 1)
        return out[:, :, : self.seq_q] if self.nq * self.block_q != self.seq_q else out

    # ----- backward -----

    def _bwd_cond(self, c):
        return c[0] < c[1]

    def _bwd_step(self, c, masked: bool):
        i, hi, j, k_block, v_block, k_seg_block, q, do, q_segs, dq, dk, dv = c
        q_block = self._q_block(q, i)  # [Q, -lse]
        do_block = self._q_block(do, i)  # [dO, -D]
        s = self.scores_nt(q_block, k_block)  # k_block is [K * scale, 1]: S - lse
        if masked:
            s = s + self._bias(i, j, ops.gather(q_segs, i, 1), k_seg_block)
        p = ops.exp(s)
        dv = dv + self.grads_tn(p, do_block)
        ds = p * self.scores_nt(do_block, v_block)  # v_block is [V, 1]: P * (dP - D)
        dq = self._add_q_block(dq, i, ops.matmul(ds, k_block))
        dk = dk + self.grads_tn(ds, q_block)
        return i + 1, hi, j, k_block, v_block, k_seg_block, q, do, q_segs, dq, dk, dv

    def _bwd_plain(self, c):
        return self._bwd_step(c, False)

    def _bwd_masked(self, c):
        return self._bwd_step(c, True)

    def _bwd_outer_cond(self, c):
        return c[0] < self.nk

    def _bwd_outer_body(self, c):
        j, q, k, v, do, q_segs, k_segs, q_lo, q_mid, q_hi, dq, dkv = c
        k_block = self._with_column(ops.gather(k, j, 2) * self.scale, 1.0)
        v_block = self._with_column(ops.gather(v, j, 2), 1.0)
        zeros = ops.zeros((self.batch, self.num_kv_heads, self.block_k, self.head_dim + 1), mstype.float32)
        mid = ops.gather(q_mid, j, 0)
        state = (ops.gather(q_lo, j, 0), mid, j, k_block, v_block, ops.gather(k_segs, j, 1), q, do, q_segs, dq,
                 zeros, zeros)
        if self.any_masked:
            state = self.while_loop(self._bwd_cond, self._bwd_masked, state)
        if self.any_plain:
            state = (mid, ops.gather(q_hi, j, 0)) + state[2:]
            state = self.while_loop(self._bwd_cond, self._bwd_plain, state)
        d = self.head_dim
        block = ops.concat((state[10][..., :d] * self.scale, state[11][..., :d]), -1).expand_dims(2)
        dkv = ops.index_add(dkv, j.reshape(1), block, 2, False, False)
        return j + 1, q, k, v, do, q_segs, k_segs, q_lo, q_mid, q_hi, state[9], dkv

    def bprop(self, q, k, v, q_seg, k_seg, out, dout):
        """FlashAttention-2 backward (Dao 2023, arXiv:2307.08691, Algorithm 2): dq, dk, dv in q's, k's and v's dtypes,
        recomputed blockwise from the saved output and log-sum-exp; a gradient on the lse column enters as
        dS += P * dLSE. Zero gradients for the segment codes."""
        if self.one_block:
            return self._one_block_backward(q, k, v, q_seg, k_seg, out, dout)
        d = self.head_dim
        d_out = dout[..., :d].astype(mstype.float32)
        lse = out[..., d]
        # D = rowsum(dO * O); a gradient flowing into the log-sum-exp enters as dS += P * dLSE.
        delta = (d_out * out[..., :d]).sum(-1) - dout[..., d]
        q6 = self._q_view(self._with_column(q, -ops.where(ops.isinf(lse), EMPTY_ROW_LSE, lse)))
        do6 = self._q_view(self._with_column(d_out, -delta))
        k5, v5 = self._kv_view(k), self._kv_view(v)
        q_segs, k_segs = self._segments(q_seg, k_seg)
        _, (q_lo, q_mid, q_hi) = self._ranges(q_segs, k_segs)
        dq = do6 * 0.0  # see _fresh_buffers_note
        dkv = ops.concat((k5, v5), -1) * 0.0
        state = (ops.zeros((), mstype.int32), q6, k5, v5, do6, q_segs, k_segs, q_lo, q_mid, q_hi, dq, dkv)
        state = self.while_loop(self._bwd_outer_cond, self._bwd_outer_body, state)
        dq = state[10].reshape(self.batch, self.num_heads, self.nq * self.block_q, d + 1)[:, :, : self.seq_q, :d]
        dkv = state[11].reshape(self.batch, self.num_kv_heads, self.nk * self.block_k, 2 * d)[:, :, : self.seq_k]
        return dq.astype(q.dtype), dkv[..., :d].astype(k.dtype), dkv[..., d:].astype(v.dtype), q_seg * 0, k_seg * 0


def segmented_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float = None,
                        return_lse: bool = False, block_q: int | None = None, block_k: int | None = None,
                        segment_ids: Tensor = None, kv_segment_ids: Tensor = None, query_mask: Tensor = None,
                        key_mask: Tensor = None):
    """Exact attention over BNSD tensors in blocks, O(seq) memory in forward and backward.

    q: (batch, num_heads, seq_q, head_dim); k, v: (batch, num_kv_heads, seq_k, head_dim), num_heads a multiple
    of num_kv_heads. Computes in float32 and returns q's dtype; with return_lse also the float32 log-sum-exp
    (batch, num_heads, seq_q), -inf on rows that see no key (their output is 0 and their gradients are 0).
    Masks: see `ascend_llm.attention.masks.segment_codes`. block_q / block_k: query and key block sizes; None
    picks `auto_block_size` of seq_q / seq_k. Raises ValueError for head counts that do not divide, or blocks < 1.
    """
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if num_heads % k.shape[1]:
        raise ValueError(f"attention: num_heads={num_heads} must be a multiple of num_kv_heads={k.shape[1]}")
    if (block_q is not None and block_q < 1) or (block_k is not None and block_k < 1):
        raise ValueError(f"attention: block_q={block_q}, block_k={block_k}: block sizes must be >= 1")
    if scale is None:
        scale = head_dim ** -0.5
    codes = segment_codes(batch, seq_q, seq_k, segment_ids, kv_segment_ids, query_mask, key_mask)
    cell = SegmentedAttention(tuple(q.shape), tuple(k.shape), causal, scale, block_q, block_k, codes is not None)
    if codes is None:
        codes = (ops.zeros((1,), mstype.int32), ops.zeros((1,), mstype.int32))
    packed = cell(q, k, v, codes[0], codes[1])
    out = packed[..., :head_dim].astype(q.dtype)
    if return_lse:
        return out, packed[..., head_dim]
    return out
