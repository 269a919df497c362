"""`CoreAttention`: the typed sub-cell through which a model calls attention.

A model holds one `core_attention` cell per attention layer, built from `AttentionConfig()` defaults (the
only place those defaults live); `apply_attention` replaces each one with a cell built from the recipe's
`attention/` group, the way `apply_precision` replaces Dense cells. Parallel converters (context parallel)
replace it the same way.
"""

from __future__ import annotations

from mindspore import nn

from ascend_llm.attention import attention, resolve_backend
from ascend_llm.config.attention import AttentionConfig


class CoreAttention(nn.Cell):
    """Causal scaled dot-product attention over BNSD tensors.

    construct(q, k, v, segment_ids=None): q (B, H, S, D), k/v (B, H_kv, S, D) of one float dtype; segment_ids
    (B, S) int32 or None (packed documents: a token attends only to earlier tokens of its own document).
    Returns (B, H, S, D) in q's dtype. The backend is fixed at construction (graphs compile against it).
    """

    def __init__(self, cfg: AttentionConfig | None = None, causal: bool = True):
        super().__init__()
        cfg = cfg or AttentionConfig()
        self.backend = resolve_backend(cfg.backend)
        self.block_q, self.block_k = cfg.block_q, cfg.block_k
        self.causal = causal
        # the fused kernel takes (B, S, N, D) as it is: the model skips its transposes (models/llama.py)
        self.layout = "BSND" if self.backend == "fused" else "BNSD"

    def construct(self, q, k, v, segment_ids=None):
        """q (B, H, S, D), k/v (B, H_kv, S, D), segment_ids (B, S) int32 or None -> (B, H, S, D) in q's dtype;
        with `layout` "BSND" every tensor is (B, S, heads, D) instead."""
        extra = {"io_layout": "BSND"} if self.layout == "BSND" else {}  # backends taking BSND: fused, naive
        if segment_ids is None:
            return attention(q, k, v, causal=self.causal, backend=self.backend,
                             block_q=self.block_q, block_k=self.block_k, **extra)
        return attention(q, k, v, causal=self.causal, backend=self.backend, block_q=self.block_q,
                         block_k=self.block_k, segment_ids=segment_ids, kv_segment_ids=segment_ids, **extra)

    def extend_repr(self) -> str:
        """Backend, block sizes and causality for `repr(cell)`."""
        return f"backend={self.backend}, block_q={self.block_q}, block_k={self.block_k}, causal={self.causal}"
