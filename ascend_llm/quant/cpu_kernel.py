"""A fused dequantize-in-the-matmul CPU kernel for `QuantLinear`: y = x @ dequant(W)^T (+ bias) that reads the int8 /
int4 codes (1/4 and 1/8 of the float32 bytes) and never materializes the float32 weight.

MindSpore 2.10 CPU has no weight-quantized matmul (`WeightQuantBatchMatmul` and `QuantBatchMatmul` are
"unregistered" on CPU; int8 `MatMul` returns int8, which overflows), so this is a small C++ library run through
`ops.Custom(func_type="aot")` (works in graph mode), built once by `precision.cpu_kernel.compile_library`.

Per block of 4 output rows the kernel unpacks the codes, applies w = scale * (code - zero) into a float32 scratch
of 4 x in floats (L1-resident), and takes the dot products with the rows of x in 4 x 4 register blocks; so the
float weight exists only 4 rows at a time. x is walked in chunks of 64 rows that stay in L2 (each code byte is read
once per chunk: once per call in decode). Groups are contiguous column ranges (col // group_size, the last one
possibly shorter), or any g_idx (act-order: scale and zero looked up per column). Vectorized by the compiler
(`omp simd` reductions; with GCC >= 12 `target_clones` builds x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline
versions, picked at load time). Decode-sized calls run on the calling thread (no OpenMP team: one started from
MindSpore's runtime threads costs more than a decode-sized matmul, see precision/cpu_kernel.py); calls of at least
2**25 multiply-adds (prefill) split the output rows over two std::threads. Float32 accumulation: the result equals
the float64 dequantize-then-matmul within float32 rounding of a length-`in` dot product. Operand dtypes are checked
in the kernel (a mismatch is an error, never a misread).

Measured (`ascend-llm bench quant`, the 24 M Qwen2's projection shapes, one sitting on a shared 2-core machine):
per call 1.1-2.5x faster than MindSpore's float32 MatMul at 1 and 8 rows (the larger the weight, the larger the
gain); whole-model decode 1.3-2.0x fp32 tokens/s when both ran MindSpore's per-op path (decode steps of plain
layers now run inference/fused_decode.py's layer kernel instead, which reads the codes itself); prompt prefill
0.5-0.95x fp32 (a blocked float32 GEMM on both cores beats these dot products at hundreds of rows; an
outer-product 6 x 16 micro-kernel was tried and was slower).

Inputs: x (M, in) float32; qweight (out, in) uint8 (int8) or (out, in // 2) uint8 (int4, code 2j in the low nibble
of byte j); scales (out, G) float16; zeros (out, G) uint8 or (1,) (symmetric: zero 2**(bits-1)); g_idx (in,) int32
or (1,); bias (out,) float32 or (1,); meta (5,) int32 [bits, has_zeros, has_g_idx, has_bias, group_size].
Output y (M, out) float32.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import ops

from ascend_llm.precision.cpu_kernel import compile_library

HALF_TO_FLOAT = r"""
// IEEE binary16 bits -> float (exact; subnormals normalized). Shared with inference/fused_quant.py.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

"""

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
""" + HALF_TO_FLOAT + r"""
struct Layer {
  const float *x; const uint8_t *q; const uint16_t *scales; const uint8_t *zeros; const int32_t *g_idx;
  const float *bias; float *y;
  int64_t M, K, N, G, group, row_bytes; int bits;
};

#define INLINE inline __attribute__((always_inline))

// Column order inside the kernel ("pair order" for int4): int8 keeps column order; int4 puts the even columns
// (low nibbles) first, then the odd ones (high nibbles), so unpacking is two contiguous stores. x is permuted
// to the same order once per call, and the dot product does not depend on the order.
static INLINE int64_t column_of(int64_t i, int64_t K, int bits) {
  return bits == 8 ? i : (i < K / 2 ? 2 * i : 2 * (i - K / 2) + 1);
}

// Weight rows [n, n + rows) dequantized into w (rows x K floats, kernel column order). `cg` (K, kernel order)
// holds each column's group when the groups are not contiguous ranges in kernel order (act-order g_idx, or int4
// with an odd group size); otherwise it is null and the loops run group by group with a constant scale.
static INLINE void dequant_rows(const Layer &L, int64_t n, int rows, float *w, float *s, float *z,
                                const int32_t *cg) {
  const float half = (float)(1 << (L.bits - 1));
  const int64_t K = L.K, H = K / 2;
  for (int r = 0; r < rows; ++r) {
    const uint8_t *q = L.q + (n + r) * L.row_bytes;
    float *wr = w + r * K;
    for (int64_t g = 0; g < L.G; ++g) {
      s[g] = half_to_float(L.scales[(n + r) * L.G + g]);
      z[g] = L.zeros ? (float)L.zeros[(n + r) * L.G + g] : half;
    }
    if (cg) {
      if (L.bits == 8) {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) wr[k] = (float)q[k];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          wr[j] = (float)(q[j] & 15);
          wr[H + j] = (float)(q[j] >> 4);
        }
      }
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) wr[k] = s[cg[k]] * (wr[k] - z[cg[k]]);
      continue;
    }
    const int64_t step = L.bits == 8 ? L.group : L.group / 2, end = L.bits == 8 ? K : H;
    for (int64_t g = 0; g < L.G; ++g) {
      const int64_t j0 = g * step, j1 = j0 + step < end ? j0 + step : end;
      const float sg = s[g], zg = z[g];
      if (L.bits == 8) {
#pragma omp simd
        for (int64_t k = j0; k < j1; ++k) wr[k] = sg * ((float)q[k] - zg);
      } else {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          wr[j] = sg * ((float)(q[j] & 15) - zg);
          wr[H + j] = sg * ((float)(q[j] >> 4) - zg);
        }
      }
    }
  }
}

// y[m .. m + MB, n .. n + rows) = x rows m .. m + MB (kernel order) . 4 dequantized weight rows w (+ bias).
// MB x 4 accumulators: each x load feeds 4 FMAs and each w load MB FMAs.
#define ROW(i) const float *x##i = x + (m + (i < MB ? i : 0)) * K;
#define ACC(i) float a##i##0 = 0.f, a##i##1 = 0.f, a##i##2 = 0.f, a##i##3 = 0.f;
#define FMA(i) if (i < MB) { const float u = x##i[k]; a##i##0 += u * c0; a##i##1 += u * c1; \
                             a##i##2 += u * c2; a##i##3 += u * c3; }
template <int MB>
static INLINE void dot_rows(const Layer &L, const float *x, const float *w, int64_t m, int64_t n, int rows) {
  const int64_t K = L.K;
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  ROW(0) ROW(1) ROW(2) ROW(3)
  ACC(0) ACC(1) ACC(2) ACC(3)
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)
  for (int64_t k = 0; k < K; ++k) {
    const float c0 = w0[k], c1 = w1[k], c2 = w2[k], c3 = w3[k];
    FMA(0) FMA(1) FMA(2) FMA(3)
  }
  const float acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
  for (int i = 0; i < MB; ++i) {
    float *ym = L.y + (m + i) * L.N + n;
    for (int r = 0; r < rows; ++r) ym[r] = acc[i][r] + (L.bias ? L.bias[n + r] : 0.f);
  }
}
#undef ROW
#undef ACC
#undef FMA

// Output rows [n0, n1) for all M rows of x. x is taken in chunks of ROWS_PER_CHUNK rows that stay in L2 while
// every 4-row weight block passes by (the block is dequantized again for each chunk: cheap next to the dots).
static const int64_t ROWS_PER_CHUNK = 64;

CLONES static void quant_matmul_range(const Layer &L, const float *x, const int32_t *cg, int64_t n0, int64_t n1) {
  const int64_t K = L.K, M = L.M;
  thread_local std::vector<float> scratch;
  const int64_t need = 4 * K + 2 * L.G;
  if ((int64_t)scratch.size() < need) scratch.resize(need);
  float *w = scratch.data(), *s = w + 4 * K, *z = s + L.G;
  for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_CHUNK) {
    const int64_t m1 = m0 + ROWS_PER_CHUNK < M ? m0 + ROWS_PER_CHUNK : M;
    for (int64_t n = n0; n < n1; n += 4) {
      const int rows = n1 - n < 4 ? (int)(n1 - n) : 4;
      dequant_rows(L, n, rows, w, s, z, cg);
      if (rows < 4) std::memset(w + rows * K, 0, (4 - rows) * K * sizeof(float));
      int64_t m = m0;
      for (; m + 4 <= m1; m += 4) dot_rows<4>(L, x, w, m, n, rows);
      if (m + 2 <= m1) {
        dot_rows<2>(L, x, w, m, n, rows);
        m += 2;
      }
      if (m < m1) dot_rows<1>(L, x, w, m, n, rows);
    }
  }
}

// Calls of at least this many multiply-adds split the output rows over two threads (std::thread, started per call:
// ~50 us, negligible at this size; no OpenMP team, see precision/cpu_kernel.py). Decode-sized calls stay on one.
static const int64_t TWO_THREADS_MACS = int64_t(1) << 25;

static void quant_matmul_impl(const Layer &L) {
  const int64_t K = L.K, M = L.M;
  const bool permute = L.bits == 4, gather = L.g_idx != nullptr || (L.bits == 4 && L.group % 2 != 0);
  std::vector<float> xp(permute ? M * K : 0);
  const float *x = L.x;
  if (permute) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < K; ++i) xp[m * K + i] = L.x[m * K + column_of(i, K, L.bits)];
    x = xp.data();
  }
  std::vector<int32_t> groups(gather ? K : 0);
  const int32_t *cg = nullptr;
  if (gather) {
    for (int64_t i = 0; i < K; ++i) {
      const int64_t c = column_of(i, K, L.bits);
      groups[i] = L.g_idx ? L.g_idx[c] : (int32_t)(c / L.group);
    }
    cg = groups.data();
  }
  if (M * K * L.N >= TWO_THREADS_MACS && L.N >= 8 && std::thread::hardware_concurrency() > 1) {
    const int64_t mid = (L.N / 8) * 4;
    std::thread other(quant_matmul_range, std::cref(L), x, cg, mid, L.N);
    quant_matmul_range(L, x, cg, 0, mid);
    other.join();
  } else {
    quant_matmul_range(L, x, cg, 0, L.N);
  }
}

extern "C" int quant_matmul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 8 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  static const char *expected[8] = {"float32", "uint8", "float16", "uint8", "int32", "float32", "int32", "float32"};
  for (int i = 0; i < 8; ++i)
    if (dtypes && dtypes[i] && std::strcmp(dtypes[i], expected[i]) != 0) return 3;
  const int32_t *meta = static_cast<const int32_t *>(params[6]);
  Layer L;
  L.bits = meta[0];
  L.x = static_cast<const float *>(params[0]);
  L.q = static_cast<const uint8_t *>(params[1]);
  L.scales = static_cast<const uint16_t *>(params[2]);
  L.zeros = meta[1] ? static_cast<const uint8_t *>(params[3]) : nullptr;
  L.g_idx = meta[2] ? static_cast<const int32_t *>(params[4]) : nullptr;
  L.bias = meta[3] ? static_cast<const float *>(params[5]) : nullptr;
  L.y = static_cast<float *>(params[7]);
  L.M = shapes[0][0];
  L.K = shapes[0][1];
  L.N = shapes[1][0];
  L.row_bytes = shapes[1][1];
  L.G = shapes[2][1];
  L.group = meta[4];
  if ((L.bits != 4 && L.bits != 8) || L.row_bytes * (L.bits == 4 ? 2 : 1) != L.K || shapes[2][0] != L.N) return 2;
  quant_matmul_impl(L);
  return 0;
}
"""

FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fopenmp-simd", "-fno-fast-math",
         "-ffp-contract=fast")


def library_path() -> str | None:
    """Path of the compiled quantized-matmul library (built on first use), or None when no C++ compiler works."""
    return compile_library("quant_matmul", SOURCE, FLAGS)


def kernel_available(device: str | None = None) -> bool:
    """True on CPU when the library builds."""
    return (device or ms.get_context("device_target")) == "CPU" and library_path() is not None


def build_quant_matmul_op() -> ops.Custom:
    """(x (M, in) f32, qweight, scales, zeros, g_idx, bias, meta) -> y (M, out) f32; see the module doc.
    Call only when kernel_available()."""
    return ops.Custom(f"{library_path()}:quant_matmul",
                      out_shape=lambda x, q, s, z, g, b, m: [x[0], q[0]],
                      out_dtype=lambda x, q, s, z, g, b, m: ms.float32, func_type="aot")
