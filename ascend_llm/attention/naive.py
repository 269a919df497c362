"""Reference attention: materialises the full score matrix. Exact; memory grows as N^2."""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops


def causal_keep_mask(seq_q: int, seq_k: int) -> Tensor:
    """Bool (seq_q, seq_k): True where query i may see key j, bottom-right aligned (j <= i + seq_k - seq_q)."""
    rows = ops.arange(seq_q).reshape(seq_q, 1)
    cols = ops.arange(seq_k).reshape(1, seq_k)
    return cols <= rows + (seq_k - seq_q)


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float = None,
                    return_lse: bool = False, **unused):
    """softmax(q k^T * scale) v over BNSD tensors, GQA by repeating K/V heads; softmax in fp32."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads != num_kv_heads:
        group = num_heads // num_kv_heads
        k = ops.repeat_interleave(k, group, axis=1)
        v = ops.repeat_interleave(v, group, axis=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = ops.matmul(q, k.swapaxes(-1, -2)).astype(ms.float32) * scale
    if causal:
        keep = causal_keep_mask(q.shape[2], k.shape[2])
        scores = ops.where(keep, scores, ops.full_like(scores, -1e30))
    row_max = scores.max(axis=-1, keepdims=True)
    lse = row_max + ops.log(ops.exp(scores - row_max).sum(-1, keepdims=True))
    probs = ops.exp(scores - lse)
    lse = lse.squeeze(-1)
    out = ops.matmul(probs.astype(v.dtype), v)
    if return_lse:
        return out, lse
    return out
