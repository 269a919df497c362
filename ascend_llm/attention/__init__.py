"""One entry point for attention over BNSD tensors, dispatching to a registered backend.

q: (batch, num_heads, seq_q, head_dim); k, v: (batch, num_kv_heads, seq_k, head_dim); the output has q's shape.

Backends: `segmented` (portable, exact, O(N) memory, custom FlashAttention-2 backward), `fused` (Ascend's
FlashAttentionScore kernel), `naive` (reference, materialises the score matrix); `auto` picks fused on Ascend
and segmented elsewhere. Options every backend understands:
- causal: bottom-right aligned (query i sees key j when j <= i + seq_k - seq_q);
- scale: softmax scale, default 1/sqrt(head_dim);
- return_lse: also return the float32 log-sum-exp (batch, num_heads, seq_q), for `merge_attention`;
- segment_ids / kv_segment_ids: packed documents, tokens attend only within their own document;
- query_mask / key_mask: (batch, seq) True = real token, False = padding;
- block_q / block_k: block sizes of the segmented backend (ignored by the others).
Rows that see no key give output 0, log-sum-exp -inf and zero gradients.
"""

from __future__ import annotations

from typing import Callable

import mindspore as ms

from ascend_llm.attention.fused import FusedAttentionUnavailable, fused_attention
from ascend_llm.attention.merge import empty_partial, merge_attention
from ascend_llm.attention.naive import naive_attention
from ascend_llm.attention.segmented import segmented_attention

_BACKENDS: dict[str, Callable] = {"naive": naive_attention, "segmented": segmented_attention,
                                  "fused": fused_attention}


def register_backend(name: str, fn: Callable) -> None:
    """Make `fn(q, k, v, *, causal, scale, return_lse, **options)` available as `attention(..., backend=name)`;
    replaces a backend of the same name."""
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    """Names of the registered backends, sorted (`auto` is not one: it resolves to one of them)."""
    return sorted(_BACKENDS)


def resolve_backend(backend: str) -> str:
    """`auto` picks the fused kernel on Ascend when it is registered, else segmented, else naive."""
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"attention backend={backend!r}: allowed: auto, {', '.join(available_backends())}")
        return backend
    on_ascend = ms.get_context("device_target") == "Ascend"
    for name in (("fused",) if on_ascend else ()) + ("segmented", "naive"):
        if name in _BACKENDS:
            return name
    return "naive"


def attention(q, k, v, *, causal: bool = False, backend: str = "auto", scale: float = None,
              return_lse: bool = False, **options):
    """Scaled dot-product attention (shapes and options in the module docstring): the output has q's shape and
    dtype; with return_lse also the float32 log-sum-exp (B, H, Sq). `options` go to the backend (block sizes,
    masks, segment ids). Raises ValueError for an unknown backend or kv_segment_ids without segment_ids (and,
    in segmented/fused, head counts that do not divide or block sizes < 1), FusedAttentionUnavailable for
    `fused` off Ascend."""
    fn = _BACKENDS[resolve_backend(backend)]
    return fn(q, k, v, causal=causal, scale=scale, return_lse=return_lse, **options)


__all__ = ["FusedAttentionUnavailable", "attention", "available_backends", "empty_partial", "fused_attention",
           "merge_attention", "naive_attention", "register_backend", "resolve_backend", "segmented_attention"]
