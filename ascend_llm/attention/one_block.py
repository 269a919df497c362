"""The one-block case of segmented attention: seq_q <= block_q and seq_k <= block_k (the default block is 512
tokens, so every sequence up to 512 is one block).

One block pair holds the whole score matrix, so the online softmax has one step and the loops over blocks have
one iteration each. `SegmentedAttention` then runs this straight-line code instead of its `ops.WhileLoop` nests:
the same operations in the same order on the same values (the running max starts at NEG_START and the
accumulator at zero, so the first online-softmax step is exactly this), so the output, log-sum-exp and gradients
are the loop path's, bit for bit. What changes is the graph: no loop bodies, no index_add buffers, no gathered
block views. Measured with MindSpore 2.10 on a 2-core CPU, loops first, this path second, one sitting:
`ascend-llm train debug=smoke` (2 layers, 64 tokens): train-step compile 2.4-2.7 s -> 1.6-2.0 s, the whole run
7.8-8.4 -> 6.1-6.7 CPU-s, every metric and checkpoint identical; `ascend-llm bench attention --lengths 256,512 --batch 8
--heads 8 --head-dim 32 --backends segmented` (causal forward + backward, two runs each): N=256 0.054-0.057 ->
0.045-0.046 s per call, first call 1.27-1.56 -> 0.71-0.73 s, peak 688-696 -> 602 MiB; N=512 0.146-0.152 ->
0.129-0.141 s, first call 1.59-1.92 -> 0.89-0.93 s, peak 996-1000 -> 922 MiB; the same max error (7.1e-06).

Layout as in `segmented.py`: query heads grouped by their key/value head, rows (batch, num_kv_heads, group *
seq_q, C); masks as one additive 0/-inf bias tiled to the score shape (see `_same_shape_note` there).
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops
from mindspore import dtype as mstype

NEG_START = -1e30  # running-max start: finite, so exp(m_old - m_new) never meets inf - inf
EMPTY_ROW_LSE = 1e30  # backward lse of rows that see no key: exp(score - 1e30) = 0, so their gradients are 0


class OneBlockPath:
    """Mixin of `SegmentedAttention` (which provides the shapes, scale, group, rows, has_segments, the
    BatchMatMul primitives and `_with_column`): forward and backward for one block pair."""

    def _one_block_constants(self, causal: bool) -> None:
        """The causal mask of a one-block cell as a constant (1, 1, group * seq_q, seq_k) float32 0/-inf bias,
        else None (never built for the loop path, where seq_q * seq_k may be large)."""
        self.one_block_bias = None
        if causal and self.one_block:
            keys = np.arange(self.seq_k)[None, :]
            keep = keys <= np.arange(self.seq_q)[:, None] + (self.seq_k - self.seq_q)
            bias = np.where(np.tile(keep, (self.group, 1)), 0.0, -np.inf).astype(np.float32)
            self.one_block_bias = Tensor(bias.reshape(1, 1, self.rows, self.seq_k))

    def _one_block_scores_bias(self, q_seg, k_seg):
        """Additive mask at the score shape (B, Hkv, group * Sq, Sk) float32, or None (nothing masked)."""
        bias = self.one_block_bias
        if self.has_segments:
            same = q_seg.astype(mstype.int32).reshape(self.batch, self.seq_q, 1) == k_seg.astype(
                mstype.int32).reshape(self.batch, 1, self.seq_k)
            seg = ops.where(same, 0.0, float("-inf")).astype(mstype.float32).reshape(self.batch, 1, self.seq_q,
                                                                                        self.seq_k)
            if self.group > 1:
                seg = ops.tile(seg, (1, self.group, 1, 1)).reshape(self.batch, 1, self.rows, self.seq_k)
            bias = seg if bias is None else seg + bias
        if bias is None:
            return None
        return ops.tile(bias, (self.batch // bias.shape[0], self.num_kv_heads, 1, 1))

    def _one_block_forward(self, q, k, v, q_seg, k_seg):
        """As `SegmentedAttention.construct`: float32 (B, H, Sq, D + 1), the log-sum-exp in the last column."""
        d = self.head_dim
        q_rows = q.astype(mstype.float32).reshape(self.batch, self.num_kv_heads, self.rows, d) * self.scale
        s = self.scores_nt(q_rows, k.astype(mstype.float32))
        bias = self._one_block_scores_bias(q_seg, k_seg)
        if bias is not None:
            s = s + bias
        m = ops.maximum(ops.ones((self.batch, self.num_kv_heads, self.rows, 1), mstype.float32) * NEG_START,
                        s.max(axis=-1, keepdims=True))
        p = ops.exp(s - ops.tile(m, (1, 1, 1, self.seq_k)))
        acc = ops.matmul(p, self._with_column(v, 1.0))  # last column: the row sums of p
        lsum = acc[..., d:]
        seen = lsum > 0
        safe = ops.where(seen, lsum, 1.0)
        out = ops.concat((acc[..., :d] / safe, ops.where(seen, m + ops.log(safe), float("-inf"))), -1)
        return out.reshape(self.batch, self.num_heads, self.seq_q, d + 1)

    def _one_block_backward(self, q, k, v, q_seg, k_seg, out, dout):
        """As `SegmentedAttention.bprop` (FlashAttention-2's backward for one block pair): dq, dk, dv in q's, k's
        and v's dtypes; a gradient on the lse column enters as dS += P * dLSE; zero gradients for the codes."""
        d, shape = self.head_dim, (self.batch, self.num_kv_heads, self.rows, self.head_dim + 1)
        d_out = dout[..., :d].astype(mstype.float32)
        lse = out[..., d]
        delta = (d_out * out[..., :d]).sum(-1) - dout[..., d]
        q_aug = self._with_column(q, -ops.where(ops.isinf(lse), EMPTY_ROW_LSE, lse)).reshape(shape)  # [Q, -lse]
        do_aug = self._with_column(d_out, -delta).reshape(shape)  # [dO, -D]
        k_aug = self._with_column(k.astype(mstype.float32) * self.scale, 1.0)  # [K * scale, 1]
        s = self.scores_nt(q_aug, k_aug)  # S - lse
        bias = self._one_block_scores_bias(q_seg, k_seg)
        if bias is not None:
            s = s + bias
        p = ops.exp(s)
        dv = self.grads_tn(p, do_aug)
        ds = p * self.scores_nt(do_aug, self._with_column(v, 1.0))  # P * (dP - D)
        dq = ops.matmul(ds, k_aug)[..., :d].reshape(self.batch, self.num_heads, self.seq_q, d)
        dk = self.grads_tn(ds, q_aug)[..., :d] * self.scale
        return dq.astype(q.dtype), dk.astype(k.dtype), dv[..., :d].astype(v.dtype), q_seg * 0, k_seg * 0
