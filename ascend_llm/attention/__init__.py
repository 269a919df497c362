"""One entry point for attention over BNSD tensors, dispatching to a registered backend.

q: (batch, num_heads, seq_q, head_dim); k, v: (batch, num_kv_heads, seq_k, head_dim); the output has q's shape.
"""

from __future__ import annotations

from typing import Callable

import mindspore as ms

from ascend_llm.attention.naive import naive_attention

_BACKENDS: dict[str, Callable] = {"naive": naive_attention}


def register_backend(name: str, fn: Callable) -> None:
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
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
    """Scaled dot-product attention. `options` go to the backend (block sizes, masks, segment ids)."""
    fn = _BACKENDS[resolve_backend(backend)]
    return fn(q, k, v, causal=causal, scale=scale, return_lse=return_lse, **options)


__all__ = ["attention", "available_backends", "naive_attention", "register_backend", "resolve_backend"]
