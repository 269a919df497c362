"""Ascend fast path of the paged KV cache: MindSpore's fused ReshapeAndCache and PagedAttention operators (the ones
vLLM-MindSpore's `Attention` layer and MindFormers' `PagedAttentionMgr` call on Atlas A2 / 910B), behind the
engine's interface and cache layout (num_blocks, block_size, num_kv_heads, head_dim).

The operators (MindSpore 2.10, `mindspore.ops.auto_generate`; no CPU kernel: "Unsupported op [...] on CPU"):
- `ReshapeAndCache()(key, value, key_cache, value_cache, slot_mapping)` stores token i's key/value rows at slot
  slot_mapping[i] = block_id * block_size + offset of the caches, in place (the caches are RW_WRITE inputs; the
  output, the key, is what later ops `ops.depend` on). MindSpore 2.10's shape inference counts a 3-D key's tokens
  as key.shape[0] * key.shape[1], so a (num_tokens, num_kv_heads, head_dim) key is refused; keys and values go in as
  (1, num_tokens, num_kv_heads * head_dim), as vLLM-MindSpore passes them.
- `PagedAttention(head_num, scale_value, kv_head_num)(query, key_cache, value_cache, block_tables, context_lens)`:
  query (num_tokens, num_heads, head_dim), one query token per sequence (decode); block_tables (num_tokens,
  max_blocks) int32; context_lens (num_tokens,) int32 = keys visible to the query, the token just written included
  (positions 0 .. context_lens - 1 read through the block table); output: the query's shape and dtype.
  Query head h reads KV head h // (num_heads / num_kv_heads) (GQA); the softmax scale is explicit.

Constraints, checked here before anything runs (so a bad layout fails on CPU tests, not on the device):
- query and caches float16 or bfloat16, one dtype (MindSpore's PagedAttention type inference); a float32 query
  runs in the cache's dtype and the output is cast back; keys and values are cast to the cache's dtype;
- ATB PagedAttentionOperation (CANN 8.0.RC2 docs): block_size % 16 == 0, head_dim in (0, 256],
  head_dim * block_size <= 128 * 128, block table entries in [0, num_blocks), num_heads % num_kv_heads == 0;
- negative (padding) slots are redirected to slot 0 of the null block 0 (which no block table reads unmasked),
  because the fused kernel's handling of negative slots is not documented.
On 910B in graph mode MindSpore's internal PagedAttention kernel reads the context lengths from the host copy of the
graph input named `batch_valid_length` (LLMManager; kernel/ascend/internal/paged_attention.cc), and vLLM-MindSpore
runs with `jit_config={"infer_boost": "on"}`. These paths have not run on Ascend hardware here; argument
construction is pure and tested on CPU, including against MindSpore's own shape/type inference of the two ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import Tensor, ops
from mindspore import dtype as mstype
from mindspore.ops.auto_generate import PagedAttention, ReshapeAndCache

CACHE_DTYPES = (mstype.float16, mstype.bfloat16)
MAX_HEAD_DIM = 256
MAX_BLOCK_ELEMENTS = 128 * 128
NULL_SLOT = 0  # slot 0 of the null block 0


class AscendOpsUnavailable(RuntimeError):
    """The fused paged-attention operators were asked for on a device that does not have them."""


def available(device: str | None = None) -> bool:
    """True when the fused ReshapeAndCache / PagedAttention can run (device Ascend)."""
    return (device or ms.get_context("device_target")) == "Ascend"


def require_ascend() -> None:
    """Raise AscendOpsUnavailable (naming the device and the portable alternative) off Ascend."""
    target = ms.get_context("device_target")
    if target != "Ascend":
        raise AscendOpsUnavailable(
            f"the fused ReshapeAndCache / PagedAttention operators exist only on Ascend (Atlas A2 / 910B and later); "
            f"this run uses device_target={target!r}. The engine's portable paged attention (gather by block table, "
            f"in-place cache writes) runs everywhere; use it off Ascend.")


@dataclass(frozen=True)
class PagedAttentionArgs:
    """What PagedAttention needs besides the tensors. layout: "TND" (query (num_tokens, num_heads, head_dim)) or
    "BNSD" (query (batch, num_heads, 1, head_dim), the engine's decode layout, reshaped to TND and back)."""

    head_num: int
    kv_head_num: int
    scale_value: float
    num_tokens: int
    head_dim: int
    layout: str
    kernel_dtype: mstype.Type

    @property
    def query_shape(self) -> tuple[int, int, int]:
        return self.num_tokens, self.head_num, self.head_dim


@dataclass(frozen=True)
class ReshapeAndCacheArgs:
    """token_shape: the (1, num_tokens, num_kv_heads * head_dim) shape keys and values are passed in."""

    token_shape: tuple[int, int, int]
    kernel_dtype: mstype.Type


def _check_cache(cache_shape: tuple, cache_dtype, num_kv_heads: int, head_dim: int, name: str) -> None:
    if len(cache_shape) != 4:
        raise ValueError(f"{name}: shape {cache_shape}: must be (num_blocks, block_size, num_kv_heads, head_dim)")
    _, block_size, kv_heads, dim = cache_shape
    if kv_heads != num_kv_heads or dim != head_dim:
        raise ValueError(f"{name}: shape {cache_shape}: expected num_kv_heads={num_kv_heads}, head_dim={head_dim}")
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"{name}: dtype {cache_dtype}: the fused kernels need float16 or bfloat16")
    if block_size % 16:
        raise ValueError(f"{name}: block_size={block_size}: the fused kernels need a multiple of 16")
    if not 0 < head_dim <= MAX_HEAD_DIM or head_dim * block_size > MAX_BLOCK_ELEMENTS:
        raise ValueError(f"{name}: head_dim={head_dim}, block_size={block_size}: the fused kernels need head_dim "
                         f"in (0, {MAX_HEAD_DIM}] and head_dim * block_size <= {MAX_BLOCK_ELEMENTS}")


def paged_attention_args(q_shape: tuple, cache_shape: tuple, cache_dtype, block_tables_shape: tuple,
                         context_lens_shape: tuple, scale: float, num_kv_heads: int) -> PagedAttentionArgs:
    """Validate the shapes of a decode step and derive the kernel arguments; ValueError names the bad argument.

    q_shape: (num_tokens, num_heads, head_dim) or (batch, num_heads, 1, head_dim); caches as in the module doc;
    block_tables (num_tokens, max_blocks); context_lens (num_tokens,)."""
    if len(q_shape) == 4:
        if q_shape[2] != 1:
            raise ValueError(f"paged_attention: q shape {q_shape}: PagedAttention takes one query token per sequence "
                             f"(decode); prefill chunks go through the portable attention")
        num_tokens, num_heads, head_dim, layout = q_shape[0], q_shape[1], q_shape[3], "BNSD"
    elif len(q_shape) == 3:
        (num_tokens, num_heads, head_dim), layout = q_shape, "TND"
    else:
        raise ValueError(f"paged_attention: q shape {q_shape}: must be (num_tokens, num_heads, head_dim) or "
                         f"(batch, num_heads, 1, head_dim)")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    _check_cache(tuple(cache_shape), cache_dtype, num_kv_heads, head_dim, "paged_attention key_cache")
    if len(block_tables_shape) != 2 or block_tables_shape[0] != num_tokens:
        raise ValueError(f"paged_attention: block_tables shape {block_tables_shape}: must be "
                         f"({num_tokens}, max_blocks)")
    if tuple(context_lens_shape) != (num_tokens,):
        raise ValueError(f"paged_attention: context_lens shape {context_lens_shape}: must be ({num_tokens},)")
    return PagedAttentionArgs(num_heads, num_kv_heads, float(scale), num_tokens, head_dim, layout, cache_dtype)


def reshape_and_cache_args(key_shape: tuple, value_shape: tuple, cache_shape: tuple, cache_dtype,
                           slot_mapping_shape: tuple) -> ReshapeAndCacheArgs:
    """Validate key/value (num_tokens, num_kv_heads, head_dim) against the cache layout and slot_mapping
    (num_tokens,); ValueError names the bad argument."""
    if len(key_shape) != 3 or tuple(value_shape) != tuple(key_shape):
        raise ValueError(f"reshape_and_cache: key {key_shape} / value {value_shape}: both must be "
                         f"(num_tokens, num_kv_heads, head_dim)")
    num_tokens, num_kv_heads, head_dim = key_shape
    _check_cache(tuple(cache_shape), cache_dtype, num_kv_heads, head_dim, "reshape_and_cache key_cache")
    if tuple(slot_mapping_shape) != (num_tokens,):
        raise ValueError(f"reshape_and_cache: slot_mapping shape {slot_mapping_shape}: must be ({num_tokens},)")
    return ReshapeAndCacheArgs((1, num_tokens, num_kv_heads * head_dim), cache_dtype)


def kernel_query(q: Tensor, query_shape: tuple, dtype) -> Tensor:
    """q in the caller's layout -> query_shape (num_tokens, num_heads, head_dim) in the kernel dtype."""
    return q.reshape(query_shape).astype(dtype)


def from_kernel(out: Tensor, q_shape: tuple, q_dtype) -> Tensor:
    """Kernel output (num_tokens, num_heads, head_dim) -> the caller's layout and dtype."""
    return out.reshape(q_shape).astype(q_dtype)


def kernel_slots(slot_mapping: Tensor) -> Tensor:
    """(num_tokens,) int32 slots with padding (negative) slots redirected to slot 0 of the null block."""
    slots = slot_mapping.astype(mstype.int32)
    return ops.where(slots < 0, ops.zeros_like(slots) + NULL_SLOT, slots)


def kernel_tokens(x: Tensor, token_shape: tuple, dtype) -> Tensor:
    """key or value (num_tokens, num_kv_heads, head_dim) -> (1, num_tokens, num_kv_heads * head_dim), kernel dtype."""
    return x.reshape(token_shape).astype(dtype)


def _same_cache(name: str, key_shape, key_dtype, value_shape, value_dtype) -> None:
    if tuple(value_shape) != tuple(key_shape) or value_dtype != key_dtype:
        raise ValueError(f"{name}: value_cache {tuple(value_shape)} {value_dtype} must match key_cache "
                         f"{tuple(key_shape)} {key_dtype}")


@ops.constexpr
def _paged_attention_static(q_shape, cache_shape, cache_dtype, value_shape, value_dtype, tables_shape, lens_shape,
                            scale, num_kv_heads):
    """Compile-time part (graph mode folds it; its exceptions reach the caller unchanged)."""
    require_ascend()
    _same_cache("paged_attention", cache_shape, cache_dtype, value_shape, value_dtype)
    a = paged_attention_args(q_shape, cache_shape, cache_dtype, tables_shape, lens_shape, scale, num_kv_heads)
    return a.head_num, a.kv_head_num, a.scale_value, a.query_shape, a.kernel_dtype


@ops.constexpr
def _reshape_and_cache_static(key_shape, value_shape, cache_shape, cache_dtype, value_cache_shape, value_cache_dtype,
                              slots_shape):
    require_ascend()
    _same_cache("reshape_and_cache", cache_shape, cache_dtype, value_cache_shape, value_cache_dtype)
    a = reshape_and_cache_args(key_shape, value_shape, cache_shape, cache_dtype, slots_shape)
    return a.token_shape, a.kernel_dtype


def paged_attention(q: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                    scale: float, num_kv_heads: int) -> Tensor:
    """Decode attention of one query token per sequence over its blocks: softmax(scale * q k^T) v over positions
    0 .. context_lens[i] - 1 of sequence i (block table row i); GQA by head groups. q (num_tokens, num_heads, D) or
    (batch, num_heads, 1, D), any float dtype (computed in the cache's float16 / bfloat16); returns q's shape and
    dtype. Graph and PyNative mode. AscendOpsUnavailable off Ascend; ValueError for shapes or dtypes the kernel
    rejects (both raised while compiling in graph mode)."""
    head_num, kv_head_num, scale_value, query_shape, dtype = _paged_attention_static(
        q.shape, key_cache.shape, key_cache.dtype, value_cache.shape, value_cache.dtype, block_tables.shape,
        context_lens.shape, scale, num_kv_heads)
    kernel = PagedAttention(head_num, scale_value, kv_head_num)
    out = kernel(kernel_query(q, query_shape, dtype), key_cache, value_cache, block_tables.astype(mstype.int32),
                 context_lens.astype(mstype.int32))
    return from_kernel(out, q.shape, q.dtype)


def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                      slot_mapping: Tensor) -> Tensor:
    """Store key/value (num_tokens, num_kv_heads, head_dim) rows at slot_mapping (num_tokens,) int32
    (block_id * block_size + offset) of the caches, in place; returns a tensor for `ops.depend` (the ordering token).
    Graph and PyNative mode. AscendOpsUnavailable off Ascend; ValueError for shapes or dtypes the kernel rejects."""
    token_shape, dtype = _reshape_and_cache_static(key.shape, value.shape, key_cache.shape, key_cache.dtype,
                                                   value_cache.shape, value_cache.dtype, slot_mapping.shape)
    return ReshapeAndCache()(kernel_tokens(key, token_shape, dtype), kernel_tokens(value, token_shape, dtype),
                             key_cache, value_cache, kernel_slots(slot_mapping))
