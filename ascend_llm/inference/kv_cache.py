"""A preallocated key/value cache and the cached forward pass of a Llama-family `Transformer`.

The cache holds, per layer, K and V of shape (num_slots, num_kv_heads, max_len, head_dim) float32: a slot is one
sequence's rows, position p of a slot is token p of that sequence. Shapes never change, so graph mode compiles
one graph per (batch, tokens) input shape: one for prefill (per prompt-length bucket) and one for decode.

`CachedForward` reuses the model's own sub-cells (attention_norm, wq/wk/wv via `project_qkv`, wo, ffn_norm,
feed_forward, `project_logits`), so converters that replace those cells (precision, FP8, LoRA) apply here too.
Attention over the cache is plain masked softmax in float32: query at position p sees cache positions <= p of
its own slot. Tokens written past a sequence's end (prefill padding) are overwritten before any query can see
them, because a query at position p only sees positions <= p and positions are written in order.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.models.llama import rope_inv_freq, rope_tables


def empty_cache(cfg, num_slots: int, max_len: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Zeroed (keys, values): per layer a float32 Tensor (num_slots, num_kv_heads, max_len, head_dim)."""
    shape = (num_slots, cfg.num_kv_heads, max_len, cfg.head_dim)
    keys = tuple(Tensor(np.zeros(shape, np.float32)) for _ in range(cfg.num_layers))
    values = tuple(Tensor(np.zeros(shape, np.float32)) for _ in range(cfg.num_layers))
    return keys, values


class CachedForward(nn.Cell):
    """One forward step over new tokens of some cache slots, writing their K/V into the cache.

    construct(tokens, rows, start, logit_index, keys, values):
      tokens (B, T) int32 new tokens; rows (B,) int32 cache slots they belong to; start (B,) int32 position of
      tokens[:, 0] in each slot (positions start..start+T-1; positions >= max_len are not written);
      logit_index (B, K) int32 which of the T positions to return logits for; keys/values: the cache tuples.
    Returns (logits (B, K, vocab) float32, new keys, new values). Slots not in `rows` are unchanged.
    """

    def __init__(self, model: nn.Cell, max_len: int):
        super().__init__()
        cfg = model.cfg
        self.model = model
        self.max_len = max_len
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.scale = cfg.head_dim ** -0.5
        cos, sin = rope_tables(cfg.head_dim, max_len, cfg.rope_theta, rope_inv_freq(cfg))
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)
        self.cache_positions = Tensor(np.arange(max_len, dtype=np.int32))

    def _attend(self, q, keys, values, visible):
        """q (B, H, T, D); keys/values (B, H_kv, L, D) float32; visible (B, 1, T, L) bool -> (B, H, T, D) fp32."""
        batch, kv_heads, length, head_dim = keys.shape
        if self.group > 1:
            keys = ops.broadcast_to(keys.expand_dims(2), (batch, kv_heads, self.group, length, head_dim))
            values = ops.broadcast_to(values.expand_dims(2), (batch, kv_heads, self.group, length, head_dim))
            keys = keys.reshape(batch, kv_heads * self.group, length, head_dim)
            values = values.reshape(batch, kv_heads * self.group, length, head_dim)
        scores = ops.matmul(q.astype(mstype.float32), keys.swapaxes(-1, -2)) * self.scale
        scores = ops.where(visible, scores, -1e30)
        return ops.matmul(ops.softmax(scores, -1), values)

    def _write(self, cache, rows, new, write, keep):
        """Cache (S, H_kv, L, D) with `new` (B, H_kv, T, D) written at one-hot `write` (B, H_kv, L, T) of rows."""
        old = ops.gather(cache, rows, 0)
        updated = old * keep + ops.matmul(write, new.astype(cache.dtype))
        return ops.tensor_scatter_update(cache, rows.expand_dims(1), updated), updated

    def construct(self, tokens, rows, start, logit_index, keys, values):
        batch, seq = tokens.shape
        positions = start.expand_dims(1) + ops.arange(seq, dtype=mstype.int32).expand_dims(0)
        cos = ops.gather(self.rope_cos, ops.minimum(positions, self.max_len - 1), 0).expand_dims(1)
        sin = ops.gather(self.rope_sin, ops.minimum(positions, self.max_len - 1), 0).expand_dims(1)
        hit = ops.equal(positions.expand_dims(2), self.cache_positions.reshape(1, 1, -1))  # (B, T, L)
        write = hit.astype(mstype.float32).swapaxes(1, 2).expand_dims(1)  # (B, 1, L, T)
        keep = (1.0 - write.sum(-1, keepdims=True))  # (B, 1, L, 1)
        visible = ops.less_equal(self.cache_positions.reshape(1, 1, -1), positions.expand_dims(2)).expand_dims(1)
        h = self.model.tok_embeddings(tokens)
        new_keys, new_values = (), ()
        for i, layer in enumerate(self.model.layers):
            attn = layer.attention
            q, k, v = attn.project_qkv(layer.attention_norm(h), cos, sin)
            kv_write = ops.broadcast_to(write, (batch, k.shape[1], self.max_len, seq))
            cache_k, rows_k = self._write(keys[i], rows, k, kv_write, keep)
            cache_v, rows_v = self._write(values[i], rows, v, kv_write, keep)
            new_keys += (cache_k,)
            new_values += (cache_v,)
            out = self._attend(q, rows_k, rows_v, visible).astype(h.dtype)
            h = h + attn.wo(out.transpose(0, 2, 1, 3).reshape(batch, seq, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        picked = ops.gather(h, logit_index, 1, batch_dims=1)
        return self.model.project_logits(picked), new_keys, new_values
