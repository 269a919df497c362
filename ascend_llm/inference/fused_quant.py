"""The weight-only quantized matrices of the fused CPU decode layer (inference/fused_decode.py): `QuantLinear` codes
read as they are stored, dequantized in registers.

A decoder layer whose 7 projections are `QuantLinear` (int8 or int4, per channel or group-wise, symmetric or
asymmetric, contiguous groups) runs the same C++ layer as a float32 one (`decode_layer<Matrix>` in fused_decode.py:
norms, RoPE, paged attention, SwiGLU are one copy); only the matrix product differs. `gemm(.., QuantMatrix, ..)`
computes y (M, N) (+)= x (M, K) W^T (+ bias) with w = scale * (code - zero) (quant/linear.py) straight from the stored
Parameters: qweight (N, K) uint8 codes or (N, K / 2) uint8 nibble pairs (column 2j in the low nibble of byte j),
scales (N, G) float16, zeros (N, G) uint8 (symmetric: 2**(bits-1)). For 16 codes of a row it loads 16 (int8) or
8+8 (int4) bytes, widens them to float32 in a vector register, applies code * scale - zero * scale with one FMA and
multiplies with x: the weight bytes a decode step streams are the quantized bytes, and no float32 copy of a weight
exists (not even a scratch). Tiles of (rows of x) x (rows of W): 4 x 6 (24 vector accumulators, one x load feeds
6 FMAs), then 2 x 6 and 1 x 12, over blocks of 12 W rows whose codes stay in L1 while every row block of x
passes; a single row of x: 1 x 8. One horizontal sum per output at the end of the row.

From 48 (int8) or 32 (int4) rows of x on (the engine's flat prompt rows), 32 W rows at a time are dequantized into a
(K, 32) float32 panel scratch (L2-resident, 32 rows: no copy of the weight) and the float32 layer's broadcast-FMA
tiles stream it for all rows; the dequantization is a fixed ~5 ms per step over the 8 layers.

Measured (C++ harness over the 8 layers' 7 matrices of the 24 M Qwen2, best of 40 x 4 runs, thread CPU time, on
this shared 2-core Zen 5 VM, load average 8-12): batch 1 fp32 panels 2.0 ms, int8 0.71 ms, int4 0.87 ms;
batch 8 3.0 / 2.8 / 3.5 ms; batch 16 4.7 / 5.4 / 7.0 ms; 64 rows 15.6 / 21.6 / 20.1 ms (tiles: 23.4 / 29.1);
256 rows 54 / 60 / 58 ms (tiles: 97 / 124). The earlier 8 x 2 tiles (dequantize once for 8 rows of x,
but one x load per 2 FMAs) took 4.1-4.7 ms (int8) and 4.2-4.4 ms (int4) at batch 8. Variants tried and not kept:
the scale applied once per row for per-channel int8 (codes as code - zero in int32), a transposing reduction of
16 accumulators, dequantizing one W row at a time (fewer live registers, twice the x loads), int4 through a
16-float table per row and group (vpermps instead of convert + FMA), 8 x 3 and 4 x 5 tiles, int4 with the x rows
held and each W row's codes used as they are unpacked (4.9 ms at batch 8): none measured faster.

With AVX-512 the widening is vpmovzxbd + vcvtdq2ps (GCC 12 scalarizes a generic uint8 -> float vector conversion);
other CPUs get a plain loop the compiler vectorizes as it can.
"""

from __future__ import annotations

import numpy as np
from mindspore import dtype as mstype

from ascend_llm.quant.cpu_kernel import HALF_TO_FLOAT

QUANT_GEMM_SOURCE = HALF_TO_FLOAT + r"""
#if defined(__AVX512F__)
#include <immintrin.h>
static inline v16 codes16(const uint8_t *p) {
  return (v16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline void nibbles16(const uint8_t *p, v16 &lo, v16 &hi) {
  const __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
  lo = (v16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m)));
  hi = (v16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)));
}
static inline float hsum(v16 v) { return _mm512_reduce_add_ps((__m512)v); }
#else
static inline v16 codes16(const uint8_t *p) {
  v16 v;
  for (int i = 0; i < 16; ++i) v[i] = (float)p[i];
  return v;
}
static inline void nibbles16(const uint8_t *p, v16 &lo, v16 &hi) {
  for (int i = 0; i < 16; ++i) lo[i] = (float)(p[i] & 15), hi[i] = (float)(p[i] >> 4);
}
static inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
#endif

// One QuantLinear as stored: codes (N, K) or (N, K / 2) uint8, scales (N, G) binary16, zeros (N, G) or null
// (symmetric: 2**(bits-1)); column k belongs to group k / group.
struct QuantMatrix {
  const uint8_t *codes;
  const uint16_t *scales;
  const uint8_t *zeros;
  int64_t G, group;
  int bits;
};

// y[i, n + r] (+)= sum_k x[i, k] * scale * (code[n + r, k] - zero) (+ bias) for MR rows of x (K floats each; int4:
// the even columns, then the odd ones) and NR rows of W. Group by group: 16 codes at a time in registers, the rest
// of a group (group not a multiple of 16) one by one into scalar accumulators.
template <int MR, int NR>
static inline void quant_tile(const QuantMatrix &W, const float *x, int64_t K, int64_t n, float *y, int64_t ldy,
                              const float *bias, bool accumulate) {
  v16 acc[MR][NR];
  float tail[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = v16{}, tail[i][r] = 0.f;
  const int64_t rb = W.bits == 8 ? K : K / 2, H = K / 2, step = W.bits == 8 ? W.group : W.group / 2;
  const float half = (float)(1 << (W.bits - 1));
  for (int64_t g = 0; g < W.G; ++g) {
    float s[NR], zs[NR];  // w = code * s + zs
    for (int r = 0; r < NR; ++r) {
      s[r] = half_to_float(W.scales[(n + r) * W.G + g]);
      zs[r] = -s[r] * (W.zeros ? (float)W.zeros[(n + r) * W.G + g] : half);
    }
    const int64_t j0 = g * step, j1 = j0 + step < rb ? j0 + step : rb;
    int64_t j = j0;
    if (W.bits == 8) {
      for (; j + 16 <= j1; j += 16) {
        v16 w[NR];
        for (int r = 0; r < NR; ++r) w[r] = codes16(W.codes + (n + r) * rb + j) * s[r] + zs[r];
        for (int i = 0; i < MR; ++i) {
          const v16 xv = load16(x + i * K + j);
          for (int r = 0; r < NR; ++r) acc[i][r] += xv * w[r];
        }
      }
    } else {
      for (; j + 16 <= j1; j += 16) {
        v16 lo[NR], hi[NR];
        for (int r = 0; r < NR; ++r) {
          nibbles16(W.codes + (n + r) * rb + j, lo[r], hi[r]);
          lo[r] = lo[r] * s[r] + zs[r];
          hi[r] = hi[r] * s[r] + zs[r];
        }
        for (int i = 0; i < MR; ++i) {
          const v16 xl = load16(x + i * K + j), xh = load16(x + i * K + H + j);
          for (int r = 0; r < NR; ++r) {
            acc[i][r] += xl * lo[r];  // two FMAs (acc += a + b would be a multiply, an FMA and an add)
            acc[i][r] += xh * hi[r];
          }
        }
      }
    }
    for (; j < j1; ++j) {
      for (int r = 0; r < NR; ++r) {
        const uint8_t c = W.codes[(n + r) * rb + j];
        for (int i = 0; i < MR; ++i) {
          if (W.bits == 8) {
            tail[i][r] += x[i * K + j] * ((float)c * s[r] + zs[r]);
          } else {
            tail[i][r] += x[i * K + j] * ((float)(c & 15) * s[r] + zs[r]) +
                          x[i * K + H + j] * ((float)(c >> 4) * s[r] + zs[r]);
          }
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; ++r) {
      const float v = hsum(acc[i][r]) + tail[i][r] + (bias ? bias[n + r] : 0.f);
      float *o = y + i * ldy + n + r;
      *o = accumulate ? *o + v : v;
    }
  }
}

// y (M, N) (+)= x (M, K) panel^T for one (K, 32) float32 panel of columns n0 .. n0 + width (fused_decode.py).
static void panel_rows(const float *x, int64_t M, int64_t K, const float *panel, int64_t n0, int64_t width, float *y,
                       int64_t N, const float *bias, bool accumulate);

// W rows [n0, n0 + width) dequantized into a (K, 32) float32 panel (column c of the panel: row n0 + c; columns
// beyond width zero): the layout of the float32 layer's packed weights, in the original column order.
static void dequant_panel(const QuantMatrix &W, int64_t K, int64_t n0, int64_t width, float *panel) {
  const int64_t rb = W.bits == 8 ? K : K / 2;
  const float half = (float)(1 << (W.bits - 1));
  float s[32], zs[32];
  for (int64_t g = 0; g < W.G; ++g) {  // group by group, 16 columns of all 32 rows at a time (2 KB of the panel)
    for (int64_t c = 0; c < width; ++c) {
      s[c] = half_to_float(W.scales[(n0 + c) * W.G + g]);
      zs[c] = -s[c] * (W.zeros ? (float)W.zeros[(n0 + c) * W.G + g] : half);
    }
    const int64_t k0 = g * W.group, k1 = k0 + W.group < K ? k0 + W.group : K;
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      for (int64_t c = 0; c < width; ++c) {
        const uint8_t *q = W.codes + (n0 + c) * rb;
        if (W.bits == 8) {
          const v16 a = codes16(q + k) * s[c] + zs[c], b = codes16(q + k + 16) * s[c] + zs[c];
          for (int i = 0; i < 16; ++i) panel[(k + i) * 32 + c] = a[i], panel[(k + 16 + i) * 32 + c] = b[i];
        } else {  // bytes k / 2 .. k / 2 + 16: columns k + 2i (low nibble) and k + 2i + 1 (high)
          v16 lo, hi;
          nibbles16(q + k / 2, lo, hi);
          lo = lo * s[c] + zs[c];
          hi = hi * s[c] + zs[c];
          for (int i = 0; i < 16; ++i) panel[(k + 2 * i) * 32 + c] = lo[i], panel[(k + 2 * i + 1) * 32 + c] = hi[i];
        }
      }
    }
    for (; k < k1; ++k) {
      for (int64_t c = 0; c < width; ++c) {
        const uint8_t *q = W.codes + (n0 + c) * rb;
        const int code = W.bits == 8 ? q[k] : (q[k >> 1] >> (4 * (k & 1))) & 15;
        panel[k * 32 + c] = (float)code * s[c] + zs[c];
      }
    }
  }
  for (int64_t c = width; c < 32; ++c)
    for (int64_t k = 0; k < K; ++k) panel[k * 32 + c] = 0.f;
}

// MR rows of x against W rows [n, n + rows), NR at a time (rows < NR: one by one).
template <int MR, int NR>
static inline void quant_block(const QuantMatrix &W, const float *x, int64_t K, int64_t n, int64_t rows, float *y,
                               int64_t N, const float *bias, bool accumulate) {
  int64_t r = 0;
  for (; r + NR <= rows; r += NR) quant_tile<MR, NR>(W, x, K, n + r, y, N, bias, accumulate);
  for (; r < rows; ++r) quant_tile<MR, 1>(W, x, K, n + r, y, N, bias, accumulate);
}

// Rows of x from which the panel path is faster (measured on the 24 M Qwen2's matrices: the panel costs a fixed
// ~5 ms per step for its dequantization, the tiles redo their dequantization every 4 rows).
static inline int64_t panel_min_rows(int bits) { return bits == 8 ? 48 : 32; }

// Columns of y one task of the fused layer computes at a time for M rows of x (fused_decode.py splits a product's
// columns into tasks of this many across its threads): a (K, 32) panel, a block of 12 W rows, or 8 for one row.
static inline int64_t col_unit(const QuantMatrix &W, int64_t M) {
  return M >= panel_min_rows(W.bits) ? 32 : (M > 1 ? 12 : 8);
}

// The x the tiles read: int4 below panel_min_rows wants each row's even columns, then its odd ones (matching the low
// / high nibbles), written to `split` (M * K floats); otherwise x itself. Done once per product, before its tasks.
static const float *prepare(const QuantMatrix &W, const float *x, int64_t M, int64_t K, std::vector<float> &split) {
  if (W.bits != 4 || M >= panel_min_rows(W.bits)) return x;
  split.resize(M * K);
  const int64_t H = K / 2;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < H; ++j) {
      split[m * K + j] = x[m * K + 2 * j];
      split[m * K + H + j] = x[m * K + 2 * j + 1];
    }
  }
  return split.data();
}

// y[:, c0 .. c1) (+)= x (M, K) dequant(W)^T (+ bias), c0 a multiple of col_unit (xs from `prepare`): from
// panel_min_rows rows of x on, 32 rows of W at a time dequantized into an L2-resident (K, 32) float32 panel (a
// scratch of 32 rows, not a copy of the weight) streamed by the float32 layer's broadcast-FMA tiles; fewer rows:
// blocks of 12 rows of W (L1-resident codes) against every row block of x (4 x 6 tiles, then 2 x 6, 1 x 12); one
// row of x: 1 x 8 tiles. Every output element is computed the same way whatever the split into column ranges.
static void gemm_cols(const float *xs, int64_t M, int64_t K, const QuantMatrix &W, int64_t N, const float *bias,
                      float *y, bool accumulate, int64_t c0, int64_t c1) {
  c1 = c1 < N ? c1 : N;
  if (M >= panel_min_rows(W.bits)) {  // prompt chunks (flat token rows): dequantize 32 W rows once for all M rows of x
    thread_local std::vector<float> panel;
    panel.resize(K * 32);
    for (int64_t n0 = c0; n0 < c1; n0 += 32) {
      const int64_t width = c1 - n0 < 32 ? c1 - n0 : 32;
      dequant_panel(W, K, n0, width, panel.data());
      panel_rows(xs, M, K, panel.data(), n0, width, y, N, bias, accumulate);
    }
    return;
  }
  if (M > 1) {  // 4 x 6 tiles: one x load feeds 6 FMAs (2 x 4 / 8 x 2 tiles were bound by the x loads)
    for (int64_t n = c0; n < c1; n += 12) {
      const int64_t rows = c1 - n < 12 ? c1 - n : 12;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) quant_block<4, 6>(W, xs + m * K, K, n, rows, y + m * N, N, bias, accumulate);
      if (m + 2 <= M) quant_block<2, 6>(W, xs + m * K, K, n, rows, y + m * N, N, bias, accumulate), m += 2;
      if (m < M) quant_block<1, 12>(W, xs + m * K, K, n, rows, y + m * N, N, bias, accumulate);
    }
    return;
  }
  for (int64_t n = c0; n < c1; n += 8) quant_block<1, 8>(W, xs, K, n, c1 - n < 8 ? c1 - n : 8, y, N, bias, accumulate);
}
"""


def matrix_supported(cell) -> bool:
    """True for a `QuantLinear` the kernel reads: int8 or int4 uint8 codes, float16 scales, uint8 zeros or none,
    contiguous groups (no act-order g_idx), int4 groups of an even size, float32 bias or none, not MoE-stacked."""
    from ascend_llm.quant.linear import QuantLinear
    from ascend_llm.quant.rtn import effective_group_size

    if type(cell) is not QuantLinear or cell.bits not in (4, 8) or cell.g_idx is not None:
        return False
    if getattr(cell, "stacked_2d", False) or cell.qweight.dtype != mstype.uint8 or cell.scales.dtype != mstype.float16:
        return False
    if cell.zeros is not None and cell.zeros.dtype != mstype.uint8:
        return False
    if cell.has_bias and cell.bias.dtype != mstype.float32:
        return False
    return cell.bits == 8 or effective_group_size(cell.group_size, cell.in_channels) % 2 == 0


def group_sizes(cells: list) -> np.ndarray:
    """(7,) int32: columns per group of each QuantLinear (per channel: in_channels), in `MATRICES` order."""
    from ascend_llm.quant.rtn import effective_group_size

    return np.array([effective_group_size(c.group_size, c.in_channels) for c in cells], np.int32)
