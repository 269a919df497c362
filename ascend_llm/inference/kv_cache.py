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

ATTENTION_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

// e^x for 16 floats at once (Cephes expf: x = n ln2 + r with n = round(x log2 e) and ln2 in two parts, a degree-6
// polynomial in r, times 2^n built in the exponent bits); relative error a few 1e-8 on this range. x is clamped to
// [-87.3, 88.3] first (e^x stays a normal float: no inf, no denormal); NaN stays NaN. Every lane is computed the same
// way, whatever its neighbours: callers pad partial vectors (exp_inplace).
static inline v16 exp16(v16 x) {
  const v16 hi = v16{} + 88.3f, lo = v16{} - 87.3f, shift = v16{} + 12582912.0f;  // 1.5 * 2^23: round to nearest
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v16 n = (x * 1.44269504088896341f + shift) - shift;
  const v16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 y = p * (r * r) + r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// x[i] = e^(x[i] - shift) for i < n (exp16, a partial last vector through a padded copy).
static inline void exp_inplace(float *x, int64_t n, float shift) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16 v;
    std::memcpy(&v, x + i, sizeof(v));
    v = exp16(v - shift);
    std::memcpy(x + i, &v, sizeof(v));
  }
  if (i < n) {
    float tail[16] = {0};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    v16 v;
    std::memcpy(&v, tail, sizeof(v));
    v = exp16(v - shift);
    std::memcpy(tail, &v, sizeof(v));
    std::memcpy(x + i, tail, (n - i) * sizeof(float));
  }
}

#if defined(__AVX512F__)
#include <immintrin.h>
static inline float hsum16(v16 v) { return _mm512_reduce_add_ps((__m512)v); }
#else
static inline float hsum16(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
#endif

// Scratch floats paged_attention_row needs for a table of MB blocks of BS positions.
static inline int64_t attention_scratch(int64_t MB, int64_t BS) { return 2 * MB * BS; }

// HP query heads (q: HP rows of D = 16 * DC floats) against one KV head (k/v rows at offset kvh_off of each cache
// position): q and the HP output rows stay in vector registers, each cached K and V row is loaded once for the HP
// heads. scores: HP * ctx floats.
template <int DC, int HP>
static void attend_heads(const float *q, const float *kc, const float *vc, const int32_t *table, int64_t ctx,
                         int64_t BS, int64_t row, int64_t kvh_off, float scale, float *scores, float *out) {
  v16 qv[HP][DC], o[HP][DC];
  float top[HP];
  for (int h = 0; h < HP; ++h) {
    top[h] = -INFINITY;
    for (int c = 0; c < DC; ++c) std::memcpy(&qv[h][c], q + h * DC * 16 + c * 16, sizeof(v16)), o[h][c] = v16{};
  }
  const int64_t blocks = (ctx + BS - 1) / BS;
  for (int64_t blk = 0, j = 0; blk < blocks; ++blk) {
    const float *k = kc + static_cast<int64_t>(table[blk]) * BS * row + kvh_off;
    for (int64_t off = 0; off < BS && j < ctx; ++off, ++j, k += row) {
      v16 kv[DC];
      for (int c = 0; c < DC; ++c) std::memcpy(&kv[c], k + c * 16, sizeof(v16));
      for (int h = 0; h < HP; ++h) {
        v16 acc = qv[h][0] * kv[0];
        for (int c = 1; c < DC; ++c) acc += qv[h][c] * kv[c];
        const float score = hsum16(acc) * scale;
        scores[h * ctx + j] = score;
        top[h] = score > top[h] ? score : top[h];
      }
    }
  }
  float inv[HP];
  for (int h = 0; h < HP; ++h) {
    exp_inplace(scores + h * ctx, ctx, top[h]);
    double total = 0.0;
    for (int64_t j = 0; j < ctx; ++j) total += scores[h * ctx + j];
    inv[h] = static_cast<float>(1.0 / total);
  }
  for (int64_t blk = 0, j = 0; blk < blocks; ++blk) {
    const float *v = vc + static_cast<int64_t>(table[blk]) * BS * row + kvh_off;
    for (int64_t off = 0; off < BS && j < ctx; ++off, ++j, v += row) {
      v16 vv[DC];
      for (int c = 0; c < DC; ++c) std::memcpy(&vv[c], v + c * 16, sizeof(v16));
      for (int h = 0; h < HP; ++h) {
        const float p = scores[h * ctx + j] * inv[h];
        for (int c = 0; c < DC; ++c) o[h][c] += p * vv[c];
      }
    }
  }
  for (int h = 0; h < HP; ++h)
    for (int c = 0; c < DC; ++c) std::memcpy(out + h * DC * 16 + c * 16, &o[h][c], sizeof(v16));
}

// Every KV head's query heads, two at a time (attend_heads).
template <int DC>
static void attend_row(const float *q, const float *kc, const float *vc, const int32_t *table, int64_t ctx,
                       int64_t H, int64_t Hkv, int64_t BS, float scale, float *scores, float *out) {
  const int64_t G = H / Hkv, D = DC * 16, row = Hkv * D;
  for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
    int64_t h = kvh * G;
    for (; h + 2 <= (kvh + 1) * G; h += 2)
      attend_heads<DC, 2>(q + h * D, kc, vc, table, ctx, BS, row, kvh * D, scale, scores, out + h * D);
    if (h < (kvh + 1) * G)
      attend_heads<DC, 1>(q + h * D, kc, vc, table, ctx, BS, row, kvh * D, scale, scores, out + h * D);
  }
}

// Decode attention over a sequence's blocks only (vLLM's paged_attention_v1 on CPU), one query row b: q (B, H, D),
// caches (NB, BS, Hkv, D), block tables (B, MB), positions (B,) (keys 0..position are visible) -> out[b] (H, D);
// scores: attention_scratch(MB, BS) floats. Rows are independent (the fused layer hands them to its worker
// threads). Head sizes of 16, 32, 64 or 128 take the register path (attend_row), others a plain loop.
static void paged_attention_row(int64_t b, const float *q, const float *kc, const float *vc, const int32_t *tables,
                                const int32_t *positions, int64_t H, int64_t D, int64_t BS, int64_t Hkv, int64_t MB,
                                float *scores, float *out) {
  const int64_t G = H / Hkv, row = Hkv * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  int64_t ctx = static_cast<int64_t>(positions[b]) + 1;
  if (ctx > MB * BS) ctx = MB * BS;
  if (ctx < 1) ctx = 1;
  const int32_t *table = tables + b * MB;
  const float *qb = q + b * H * D;
  float *ob = out + b * H * D;
  switch (D) {
    case 16: return attend_row<1>(qb, kc, vc, table, ctx, H, Hkv, BS, scale, scores, ob);
    case 32: return attend_row<2>(qb, kc, vc, table, ctx, H, Hkv, BS, scale, scores, ob);
    case 64: return attend_row<4>(qb, kc, vc, table, ctx, H, Hkv, BS, scale, scores, ob);
    case 128: return attend_row<8>(qb, kc, vc, table, ctx, H, Hkv, BS, scale, scores, ob);
    default: break;
  }
  const int64_t blocks = (ctx + BS - 1) / BS;
  for (int64_t h = 0; h < H; ++h) {
    const int64_t kvh = h / G;
    const float *qh = qb + h * D;
    float top = -INFINITY;
    for (int64_t blk = 0, j = 0; blk < blocks; ++blk) {  // block by block: no division per position
      const float *k = kc + static_cast<int64_t>(table[blk]) * BS * row + kvh * D;
      for (int64_t off = 0; off < BS && j < ctx; ++off, ++j, k += row) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qh[d] * k[d];
        scores[j] = dot * scale;
        top = scores[j] > top ? scores[j] : top;
      }
    }
    exp_inplace(scores, ctx, top);
    double total = 0.0;
    for (int64_t j = 0; j < ctx; ++j) total += scores[j];
    float *o = ob + h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
    const float inv = static_cast<float>(1.0 / total);
    for (int64_t blk = 0, j = 0; blk < blocks; ++blk) {
      const float *v = vc + static_cast<int64_t>(table[blk]) * BS * row + kvh * D;
      for (int64_t off = 0; off < BS && j < ctx; ++off, ++j, v += row) {
        const float p = scores[j] * inv;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
      }
    }
  }
}

// Every row of q (B, H, D) -> out (B, H, D) (paged_attention_row), one after the other.
static void paged_attention_rows(const float *q, const float *kc, const float *vc, const int32_t *tables,
                                 const int32_t *positions, int64_t B, int64_t H, int64_t D, int64_t BS, int64_t Hkv,
                                 int64_t MB, float *out) {
  std::vector<float> scores(attention_scratch(MB, BS));
  for (int64_t b = 0; b < B; ++b)
    paged_attention_row(b, q, kc, vc, tables, positions, H, D, BS, Hkv, MB, scores.data(), out);
}
"""

SOURCE = ATTENTION_SOURCE + r"""
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

// params: q (B, H, D) f32, key_cache (NB, BS, Hkv, D), value_cache (same), block_tables (B, MB) i32,
// positions (B,) i32, out (B, H, D) f32.
extern "C" int PagedAttentionDecode(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  if (nparam != 6) return 1;
  paged_attention_rows(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                       static_cast<const float *>(params[2]), static_cast<const int32_t *>(params[3]),
                       static_cast<const int32_t *>(params[4]), shapes[0][0], shapes[0][1], shapes[0][2],
                       shapes[1][1], shapes[1][2], shapes[3][1], static_cast<float *>(params[5]));
  return 0;
}
"""


FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp-simd", "-ffp-contract=fast")


@functools.cache
def _library() -> str | None:
    return compile_library("paged_kv", SOURCE, FLAGS)


@functools.cache
def _cpu_writer() -> ops.Custom | None:
    path = _library()
    if path is None:
        return None
    op = ops.Custom(f"{path}:ReshapeAndCache", out_shape=lambda c, n, s: (1,),
                    out_dtype=lambda c, n, s: mstype.float32, func_type="aot")
    op.add_prim_attr("side_effect_mem", True)
    return op


def cpu_decode_attention() -> ops.Custom | None:
    """(q (B, H, D), key_cache, value_cache, block_tables (B, MB) int32, positions (B,) int32) -> (B, H, D) fp32:
    softmax(q k^T / sqrt(D)) v over keys 0..position of each row's blocks; None without a C++ compiler."""
    path = _library()
    if path is None:
        return None
    return ops.Custom(f"{path}:PagedAttentionDecode", out_shape=lambda q, k, v, t, p: q,
                      out_dtype=lambda q, k, v, t, p: q, func_type="aot")


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


class PortableCacheWrite(nn.Cell):
    """(key, value (N, H_kv, D), key_cache, value_cache, slot_mapping (N,)) -> ordering tokens (for `ops.depend`):
    both rows written in place at their slots (C++ kernel, or scatter_nd_update without a compiler)."""

    def __init__(self):
        super().__init__()
        self.writer = CacheWriter()

    def construct(self, key, value, key_cache, value_cache, slot_mapping):
        return self.writer(key_cache, key, slot_mapping), self.writer(value_cache, value, slot_mapping)


class CpuDecodeAttention(nn.Cell):
    """(q (B, H, 1, D), key_cache, value_cache, block_tables (B, MB), positions (B,)) -> (B, H, 1, D) float32 with the
    C++ kernel `cpu_decode_attention` (keys 0..position of each row's blocks)."""

    def __init__(self, kernel: ops.Custom):
        super().__init__()
        self.kernel = kernel

    def construct(self, q, key_cache, value_cache, block_tables, positions):
        batch, heads, _, dim = q.shape
        out = self.kernel(q.astype(mstype.float32).reshape(batch, heads, dim), key_cache, value_cache, block_tables,
                          positions)
        return out.reshape(batch, heads, 1, dim)


class AscendCacheWrite(nn.Cell):
    """PortableCacheWrite's contract through MindSpore's fused ReshapeAndCache (inference/ascend_ops.py)."""

    def construct(self, key, value, key_cache, value_cache, slot_mapping):
        from ascend_llm.inference import ascend_ops

        token = ascend_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
        return token, token


class AscendDecodeAttention(nn.Cell):
    """CpuDecodeAttention's contract through MindSpore's fused PagedAttention (context length = position + 1)."""

    def __init__(self, scale: float, num_kv_heads: int):
        super().__init__()
        self.scale, self.num_kv_heads = scale, num_kv_heads

    def construct(self, q, key_cache, value_cache, block_tables, positions):
        from ascend_llm.inference import ascend_ops

        return ascend_ops.paged_attention(q, key_cache, value_cache, block_tables, positions + 1, self.scale,
                                          self.num_kv_heads)


def make_cache(cfg, num_blocks: int, block_size: int, dtype=mstype.float32) -> tuple[list[Parameter], list[Parameter]]:
    """Zeroed per-layer (key_cache, value_cache) Parameters (num_blocks, block_size, num_kv_heads, head_dim) of
    `dtype` (float32 on CPU; float16 / bfloat16 for Ascend's fused operators)."""
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    keys = [Parameter(Tensor(np.zeros(shape, np.float32), dtype), name=f"key_cache.{i}", requires_grad=False)
            for i in range(cfg.num_layers)]
    values = [Parameter(Tensor(np.zeros(shape, np.float32), dtype), name=f"value_cache.{i}", requires_grad=False)
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
