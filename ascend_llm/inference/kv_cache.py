"""Paged KV cache (vLLM's PagedAttention design): a block allocator on the host, per-layer cache Parameters written
in place inside the compiled step.

Layout (shared with MindSpore's Ascend ReshapeAndCache / PagedAttention): per layer `key_cache` and `value_cache`
Parameters of shape (num_blocks, block_size, num_kv_heads, head_dim) float32; a token's K/V live at slot
block_id * block_size + offset. Block 0 is the null block: never handed out, padding rows write there and pad
block tables point there (masked out by position).

In-place writes on CPU: MindSpore 2.10's CPU ScatterNdUpdate / ScatterUpdate / InplaceUpdateV2 copy the whole
Parameter on every call (measured: 3.5 ms per call for a 67 MB cache, proportional to its size), so the CPU path
writes with a small C++ kernel (`ops.Custom(func_type="aot")`, marked side_effect_mem so graph mode orders it and
passes the Parameter's own memory): cost proportional to the tokens written. Without a C++ compiler it falls back
to `ops.scatter_nd_update` (correct, slower for large caches).
"""

from __future__ import annotations

import functools

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.precision.cpu_kernel import compile_library

NULL_BLOCK = 0

SOURCE = r"""
#include <cstdint>
#include <cstring>
// params: cache (NB, BS, H, D) f32 [written in place], new (N, H, D) f32, slots (N,) i32, out (1,) f32.
// Rows whose slot is outside [0, NB * BS) are skipped (vLLM's -1 padding slot).
extern "C" int ReshapeAndCache(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 4) return 1;
  float *cache = static_cast<float *>(params[0]);
  const float *src = static_cast<const float *>(params[1]);
  const int32_t *slots = static_cast<const int32_t *>(params[2]);
  int64_t total = 1;
  for (int i = 0; i < ndims[0]; ++i) total *= shapes[0][i];
  const int64_t row = shapes[1][1] * shapes[1][2];
  const int64_t n = shapes[1][0];
  const int64_t num_slots = total / row;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = slots[i];
    if (s < 0 || s >= num_slots) continue;
    std::memcpy(cache + s * row, src + i * row, row * sizeof(float));
  }
  static_cast<float *>(params[3])[0] = 0.0f;
  return 0;
}
"""


@functools.cache
def _cpu_writer() -> ops.Custom | None:
    path = compile_library("reshape_and_cache", SOURCE, ("-O2", "-shared", "-fPIC"))
    if path is None:
        return None
    op = ops.Custom(f"{path}:ReshapeAndCache", out_shape=lambda c, n, s: (1,),
                    out_dtype=lambda c, n, s: mstype.float32, func_type="aot")
    op.add_prim_attr("side_effect_mem", True)
    return op


class CacheWriter(nn.Cell):
    """write(cache, new, slot_mapping) -> a token to `ops.depend` on: new (N, H_kv, D) rows stored at slots
    (N,) int32 of cache (NB, BS, H_kv, D) in place; negative slots are skipped."""

    def __init__(self, in_place_kernel: bool = True):
        super().__init__()
        self.kernel = _cpu_writer() if in_place_kernel else None
        self.use_kernel = self.kernel is not None

    def construct(self, cache, new, slots):
        if self.use_kernel:
            return self.kernel(cache, new, slots)
        block_size = cache.shape[1]
        safe = ops.maximum(slots, 0)  # padding (-1) goes to the null block's slot 0
        index = ops.stack((safe // block_size, safe % block_size), -1)
        return ops.scatter_nd_update(cache, index, new)


def make_cache(cfg, num_blocks: int, block_size: int) -> tuple[list[Parameter], list[Parameter]]:
    """Zeroed per-layer (key_cache, value_cache) Parameters (num_blocks, block_size, num_kv_heads, head_dim) fp32."""
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    keys = [Parameter(Tensor(np.zeros(shape, np.float32)), name=f"key_cache.{i}", requires_grad=False)
            for i in range(cfg.num_layers)]
    values = [Parameter(Tensor(np.zeros(shape, np.float32)), name=f"value_cache.{i}", requires_grad=False)
              for i in range(cfg.num_layers)]
    return keys, values


class BlockAllocator:
    """Free list of cache blocks and a block table per sequence (host side, O(1) per block).

    num_blocks includes the null block 0, which is never handed out: num_free() + num_used() == num_blocks - 1.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}

    def num_free(self) -> int:
        return len(self.free)

    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens positions."""
        return -(-num_tokens // self.block_size)

    def can_hold(self, seq_id: str, num_tokens: int) -> bool:
        """Whether `seq_id` can grow to num_tokens positions with the blocks free now."""
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_for(num_tokens) - have <= len(self.free)

    def ensure(self, seq_id: str, num_tokens: int) -> bool:
        """Grow seq_id's table to hold num_tokens positions; False (nothing taken) when blocks are short."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self.free):
            return False
        for _ in range(max(0, need)):
            table.append(self.free.pop())
        return True

    def release(self, seq_id: str) -> int:
        """Return every block of seq_id to the free list; returns how many."""
        table = self.tables.pop(seq_id, [])
        self.free.extend(reversed(table))
        return len(table)

    def table(self, seq_id: str) -> list[int]:
        return self.tables.get(seq_id, [])

    def slots(self, seq_id: str, start: int, count: int) -> np.ndarray:
        """Slot ids (count,) int32 of positions start..start+count-1 of seq_id (blocks must be held)."""
        positions = np.arange(start, start + count)
        table = np.asarray(self.tables[seq_id], np.int64)
        return (table[positions // self.block_size] * self.block_size + positions % self.block_size).astype(np.int32)
