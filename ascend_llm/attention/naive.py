"""Reference attention: materialises the full score matrix. Exact; memory grows as seq_q * seq_k."""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from ascend_llm.attention.masks import causal_keep_mask, keep_mask, segment_codes

__all__ = ["causal_keep_mask", "naive_attention"]


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float = None,
                    return_lse: bool = False, segment_ids: Tensor = None, kv_segment_ids: Tensor = None,
                    query_mask: Tensor = None, key_mask: Tensor = None, **unused):
    """softmax(q k^T * scale) v over BNSD tensors, GQA by repeating K/V heads, softmax in fp32.

    Same masks and conventions as the other backends (see `masks.segment_codes`): rows that see no key give
    output 0 and log-sum-exp -inf. Block sizes and other backend options in `unused` are ignored.
    """
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if num_heads != k.shape[1]:
        group = num_heads // k.shape[1]
        k = ops.repeat_interleave(k, group, axis=1)
        v = ops.repeat_interleave(v, group, axis=1)
    if scale is None:
        scale = head_dim ** -0.5
    scores = ops.matmul(q, k.swapaxes(-1, -2)).astype(ms.float32) * scale
    keep = keep_mask(seq_q, seq_k, causal, segment_codes(batch, seq_q, seq_k, segment_ids, kv_segment_ids,
                                                          query_mask, key_mask))
    if keep is not None:
        scores = ops.where(keep, scores, float("-inf"))
    row_max = scores.max(axis=-1, keepdims=True)
    seen = row_max > float("-inf")
    row_max = ops.where(seen, row_max, 0.0)
    exp = ops.exp(scores - row_max)
    total = exp.sum(-1, keepdims=True)
    safe_total = ops.where(seen, total, 1.0)
    probs = exp / safe_total
    out = ops.matmul(probs.astype(v.dtype), v)
    if return_lse:
        lse = ops.where(seen, row_max + ops.log(safe_total), float("-inf")).squeeze(-1)
        return out, lse
    return out
