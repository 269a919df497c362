"""Merging partial attention results by log-sum-exp (for ring attention, KV-cache chunks, split keys).

If out_a, lse_a is attention of q over key set A and out_b, lse_b over a disjoint key set B, then
`merge_attention(out_a, lse_a, out_b, lse_b)` is attention over A ∪ B, exactly. A partial over no keys
(output 0, lse -inf, as every backend returns for fully masked rows) is the identity.
"""

from __future__ import annotations

from mindspore import Tensor, ops
from mindspore import dtype as mstype


def empty_partial(q: Tensor) -> tuple[Tensor, Tensor]:
    """The partial result over no keys: output 0 of q's shape and dtype, lse -inf (batch, heads, seq_q)."""
    zeros = ops.zeros(q.shape, q.dtype)
    return zeros, ops.zeros(q.shape[:-1], mstype.float32) + float("-inf")


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial results (out: (..., seq, head_dim), lse: (..., seq) float32) into (out, lse).

    out = (out_a * exp(lse_a) + out_b * exp(lse_b)) / (exp(lse_a) + exp(lse_b)), computed stably in fp32;
    rows empty in both stay output 0, lse -inf (no NaN).
    """
    lse_a = lse_a.astype(mstype.float32)
    lse_b = lse_b.astype(mstype.float32)
    top = ops.maximum(lse_a, lse_b)
    top = ops.where(top > float("-inf"), top, 0.0)
    weight_a = ops.exp(lse_a - top)
    weight_b = ops.exp(lse_b - top)
    total = weight_a + weight_b
    seen = total > 0
    safe_total = ops.where(seen, total, 1.0)
    out = (out_a.astype(mstype.float32) * (weight_a / safe_total).expand_dims(-1)
           + out_b.astype(mstype.float32) * (weight_b / safe_total).expand_dims(-1))
    lse = ops.where(seen, top + ops.log(safe_total), float("-inf"))
    return out.astype(out_a.dtype), lse
