"""Fused backend: Ascend's FlashAttentionScore kernel (`ops.flash_attention_score`, Atlas A2 / 910B and later).

Conventions of the kernel, all handled here:
- its `attn_mask` marks positions to DISCARD (1/True = hidden), the opposite of our keep masks;
- causal masking uses sparse_mode 2 (top-left aligned) or 3 (bottom-right aligned) with the compressed
  2048 x 2048 upper-triangular mask, never an S x S one; our causal convention is bottom-right, so
  seq_q == seq_k uses mode 2 (the two coincide) and seq_q != seq_k uses mode 3;
- padding and packed-document masks need the full (batch, 1, seq_q, seq_k) discard mask (sparse_mode 0);
- the softmax scale is passed explicitly (`scale_value`): the kernel defaults to 1.0, not 1/sqrt(head_dim);
- inputs must be float16 or bfloat16 and head_dim a multiple of 16 (<= 512); float32 inputs run in bfloat16
  and the output is cast back;
- layout BNSD (ours) is passed through; BSH / BSND are available by transposing;
- the kernel leaves rows that see no key undefined: they are set to output 0 and log-sum-exp -inf here.

The argument construction is pure and tested on CPU; running the kernel requires Ascend and raises a clear
error elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore import dtype as mstype
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from ascend_llm.attention.masks import keep_mask, segment_codes

COMPRESSED_MASK_SIZE = 2048
LAYOUTS = ("BNSD", "BSND", "BSH")
INT_MAX = 2147483647


class FusedAttentionUnavailable(RuntimeError):
    """The fused kernel was asked for on a device that does not have it."""


@dataclass(frozen=True)
class FusedArgs:
    """Everything FlashAttentionScore needs besides the tensors."""

    head_num: int
    scale_value: float
    input_layout: str
    sparse_mode: int
    mask: str  # "none", "compressed" (2048 x 2048 causal) or "full" ((batch, 1, seq_q, seq_k) discard mask)
    pre_tokens: int = INT_MAX
    next_tokens: int = INT_MAX


def fused_args(q_shape: tuple, kv_shape: tuple, causal: bool, scale: float = None, has_mask: bool = False,
               layout: str = "BNSD") -> FusedArgs:
    """Kernel arguments for BNSD shapes q (B, N1, S1, D), k/v (B, N2, S2, D); raises ValueError on shapes the
    kernel rejects."""
    if layout not in LAYOUTS:
        raise ValueError(f"fused attention: layout={layout!r}: allowed: {', '.join(LAYOUTS)}")
    _, num_heads, seq_q, head_dim = q_shape
    num_kv_heads, seq_k = kv_shape[1], kv_shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"fused attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if head_dim % 16 or head_dim > 512:
        raise ValueError(f"fused attention: head_dim={head_dim}: FlashAttentionScore needs a multiple of 16, <= 512")
    scale_value = float(head_dim ** -0.5 if scale is None else scale)
    if has_mask:
        return FusedArgs(num_heads, scale_value, layout, 0, "full")
    if causal:
        return FusedArgs(num_heads, scale_value, layout, 2 if seq_q == seq_k else 3, "compressed")
    return FusedArgs(num_heads, scale_value, layout, 0, "none")


def compressed_causal_mask() -> np.ndarray:
    """The 2048 x 2048 discard mask of sparse_mode 2/3: True strictly above the diagonal."""
    return np.triu(np.ones((COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE), dtype=bool), k=1)


def discard_mask(seq_q: int, seq_k: int, causal: bool, codes) -> Tensor:
    """Full discard mask (batch, 1, seq_q, seq_k), True = hidden, from segment codes (and causal)."""
    keep = keep_mask(seq_q, seq_k, causal, codes)
    return ops.logical_not(keep)


def to_layout(x: Tensor, layout: str) -> Tensor:
    """BNSD -> the kernel's layout."""
    if layout == "BNSD":
        return x
    x = x.transpose(0, 2, 1, 3)
    if layout == "BSND":
        return x
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])


def from_layout(x: Tensor, layout: str, num_heads: int) -> Tensor:
    """The kernel's layout -> BNSD."""
    if layout == "BNSD":
        return x
    if layout == "BSH":
        x = x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads)
    return x.transpose(0, 2, 1, 3)


def kernel_dtype(dtype) -> mstype.Type:
    """FlashAttentionScore computes in float16 or bfloat16; anything else runs in bfloat16."""
    return dtype if dtype in (mstype.float16, mstype.bfloat16) else mstype.bfloat16


def require_ascend() -> None:
    """Raises FusedAttentionUnavailable (a RuntimeError, not a UserInputError) unless device_target is Ascend:
    ops.flash_attention_score exists only there."""
    target = ms.get_context("device_target")
    if target != "Ascend":
        raise FusedAttentionUnavailable(
            f"attention backend 'fused' runs ops.flash_attention_score, which exists only on Ascend (910B/A2 and "
            f"later); this run uses device_target={target!r}. Use attention=segmented (exact, O(N) memory) or "
            f"attention=auto, which picks segmented off Ascend.")


def bnsd_shape(shape: tuple, io_layout: str) -> tuple:
    """A (B, N, S, D) shape from a tensor shape in `io_layout` ("BNSD" or "BSND")."""
    return tuple(shape) if io_layout == "BNSD" else (shape[0], shape[2], shape[1], shape[3])


def fused_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: float = None,
                    return_lse: bool = False, segment_ids: Tensor = None, kv_segment_ids: Tensor = None,
                    query_mask: Tensor = None, key_mask: Tensor = None, layout: str = "BNSD",
                    io_layout: str = "BNSD", **unused):
    """FlashAttentionScore over BNSD tensors with the entry point's conventions (block sizes are ignored).
    io_layout "BSND": q, k, v and the output are (B, S, heads, D) and go to the kernel as they are (its BSND
    layout, `layout` ignored): no transposes, and the caller can keep the kernel's own output (models/llama.py)."""
    require_ascend()
    if io_layout == "BSND":
        layout = "BSND"
    q_shape, kv_shape = bnsd_shape(q.shape, io_layout), bnsd_shape(k.shape, io_layout)
    batch, num_heads, seq_q, _ = q_shape
    seq_k = kv_shape[2]
    codes = segment_codes(batch, seq_q, seq_k, segment_ids, kv_segment_ids, query_mask, key_mask)
    args = fused_args(q_shape, kv_shape, causal, scale, codes is not None, layout)
    attn_mask = None
    seen = None
    if args.mask == "full":
        hidden = discard_mask(seq_q, seq_k, causal, codes)
        attn_mask = hidden.astype(mstype.uint8)
        seen = ops.logical_not(hidden.all(axis=-1, keep_dims=True))  # (B, 1, Sq, 1)
    elif args.mask == "compressed":
        attn_mask = Tensor(compressed_causal_mask().astype(np.uint8))
        if seq_q > seq_k:  # bottom-right causal: the first seq_q - seq_k rows see no key
            seen = Tensor((np.arange(seq_q) >= seq_q - seq_k).reshape(1, 1, seq_q, 1))
    dtype = kernel_dtype(q.dtype)
    kernel = FlashAttentionScore(args.head_num, 1.0, args.scale_value, args.pre_tokens, args.next_tokens, 0,
                                 args.input_layout, args.sparse_mode)
    if io_layout == "BSND":
        inputs = (q.astype(dtype), k.astype(dtype), v.astype(dtype))
    else:
        inputs = (to_layout(q.astype(dtype), layout), to_layout(k.astype(dtype), layout),
                  to_layout(v.astype(dtype), layout))
    softmax_max, softmax_sum, _, out = kernel(*inputs, None, None, None, attn_mask, None, None, None)
    if io_layout != "BSND":
        out = from_layout(out, layout, num_heads)
    out = out.astype(q.dtype)
    lse = softmax_max[..., 0] + ops.log(softmax_sum[..., 0])
    if seen is not None:
        if io_layout == "BSND":
            seen = seen.swapaxes(1, 2)  # (B, 1, Sq, 1) -> (B, Sq, 1, 1)
        out = ops.where(seen, out, 0.0).astype(q.dtype)
        lse = ops.where(seen.squeeze(-1), lse, float("-inf"))
    if return_lse:
        return out, lse
    return out
