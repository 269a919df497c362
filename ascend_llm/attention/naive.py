"""Reference attention: materialises the full score matrix. Exact; memory grows as seq_q * seq_k.

Memory kept for the backward (issue 23). Autodiff of the textbook formula keeps three float32 (B, H, Sq, Sk)
tensors per layer (the masked scores, exp and the probabilities) plus K/V repeated to every head. With masks
(the causal and document cases the models use) the output goes through `NaiveAttentionKernel`, whose
hand-written backward recomputes the probabilities from q and the un-repeated k, v (the way FlashAttention's
backward does, Dao et al. 2022 sec. 3.1), so a layer keeps only q, k, v, the keep mask and its output; the
(B, H, Sq, Sk) tensors exist for one layer at a time, while it runs forward or backward. Same values as the
autodiff formula up to float32 rounding. Without any mask (non-causal, no segments), and when the log-sum-exp
is asked for (context parallel's merge), the autodiff formula runs as before.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from ascend_llm.attention.masks import causal_keep_mask, keep_mask, segment_codes

__all__ = ["NaiveAttentionKernel", "causal_keep_mask", "naive_attention"]


def _repeat_kv(x: Tensor, group: int) -> Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * group, S, D): each KV head repeated for the `group` query heads that use it."""
    return x if group == 1 else ops.repeat_interleave(x, group, axis=1)


def _sum_groups(x: Tensor, group: int) -> Tensor:
    """Transpose of `_repeat_kv`: (B, H_kv * group, S, D) -> (B, H_kv, S, D), summing each head's group."""
    if group == 1:
        return x
    batch, heads, seq, dim = x.shape
    return x.reshape(batch, heads // group, group, seq, dim).sum(2)


def _probabilities(q, k_rep, keep, scale):
    """float32 softmax(q k^T * scale) over keep (True = attend); rows that see no key are all zero."""
    scores = ops.matmul(q, k_rep.swapaxes(-1, -2)).astype(ms.float32) * scale
    scores = ops.where(keep, scores, float("-inf"))
    row_max = scores.max(axis=-1, keepdims=True)
    seen = row_max > float("-inf")
    row_max = ops.where(seen, row_max, 0.0)
    exp = ops.exp(scores - row_max)
    total = ops.where(seen, exp.sum(-1, keepdims=True), 1.0)
    return exp / total


class NaiveAttentionKernel(nn.Cell):
    """out = softmax(q k^T * scale, masked by keep) v with a backward that recomputes the probabilities.

    construct(q (B, H, Sq, D), k and v (B, H_kv, Sk, D) of one float dtype, keep (B or 1, 1, Sq, Sk) bool,
    scale float32 scalar Tensor) -> (B, H, Sq, D) in v's dtype; GQA: H a multiple of H_kv. The backward, with
    P the recomputed float32 probabilities and dO the output gradient, is the softmax chain rule
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) * scale,  dQ = dS K,  dK = dS^T Q,
    with dK, dV summed over each KV head's query-head group and the GEMM operands in the inputs' dtype, as the
    autodiff of the forward has them.
    """

    def construct(self, q, k, v, keep, scale):
        """See the class docstring."""
        group = q.shape[1] // k.shape[1]
        probs = _probabilities(q, _repeat_kv(k, group), keep, scale)
        return ops.matmul(probs.astype(v.dtype), _repeat_kv(v, group))

    def bprop(self, q, k, v, keep, scale, out, dout):
        """Gradients of q, k, v in their dtypes; zero for the mask and the scale."""
        group = q.shape[1] // k.shape[1]
        k_rep, v_rep = _repeat_kv(k, group), _repeat_kv(v, group)
        probs = _probabilities(q, k_rep, keep, scale)
        d_out = dout.astype(v.dtype)
        dv = ops.matmul(probs.astype(v.dtype).swapaxes(-1, -2), d_out)
        dp = ops.matmul(d_out, v_rep.swapaxes(-1, -2)).astype(ms.float32)
        delta = (dout.astype(ms.float32) * out.astype(ms.float32)).sum(-1, keepdims=True)
        ds = (probs * (dp - delta) * scale).astype(q.dtype)
        dq = ops.matmul(ds, k_rep)
        dk = ops.matmul(ds.swapaxes(-1, -2), q)
        return (dq, _sum_groups(dk, group).astype(k.dtype), _sum_groups(dv, group).astype(v.dtype),
                ops.zeros_like(keep), ops.zeros_like(scale))


_kernel = NaiveAttentionKernel()


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float = None,
                    return_lse: bool = False, segment_ids: Tensor = None, kv_segment_ids: Tensor = None,
                    query_mask: Tensor = None, key_mask: Tensor = None, io_layout: str = "BNSD", **unused):
    """softmax(q k^T * scale) v over BNSD tensors, GQA by repeating K/V heads, softmax in fp32.

    Same masks and conventions as the other backends (see `masks.segment_codes`): rows that see no key give
    output 0 and log-sum-exp -inf. Block sizes and other backend options in `unused` are ignored. Masked calls
    without the log-sum-exp run through `NaiveAttentionKernel` (module doc: what is kept for the backward).
    io_layout "BSND": q, k, v and the output are (B, S, heads, D) (transposed here; the fused backend's layout,
    so the model's BSND path runs on CPU too).
    """
    if io_layout != "BSND":
        return _naive_bnsd(q, k, v, causal, scale, return_lse, segment_ids, kv_segment_ids, query_mask, key_mask)
    out = _naive_bnsd(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), causal, scale, return_lse,
                      segment_ids, kv_segment_ids, query_mask, key_mask)
    return (out[0].swapaxes(1, 2), out[1]) if return_lse else out.swapaxes(1, 2)


def _naive_bnsd(q, k, v, causal, scale, return_lse, segment_ids, kv_segment_ids, query_mask, key_mask):
    """`naive_attention` over BNSD tensors."""
    batch, num_heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if scale is None:
        scale = head_dim ** -0.5
    keep = keep_mask(seq_q, seq_k, causal, segment_codes(batch, seq_q, seq_k, segment_ids, kv_segment_ids,
                                                          query_mask, key_mask))
    if keep is not None and not return_lse:
        return _kernel(q, k, v, keep, Tensor(scale, ms.float32))
    if num_heads != k.shape[1]:
        group = num_heads // k.shape[1]
        k = ops.repeat_interleave(k, group, axis=1)
        v = ops.repeat_interleave(v, group, axis=1)
    scores = ops.matmul(q, k.swapaxes(-1, -2)).astype(ms.float32) * scale
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
