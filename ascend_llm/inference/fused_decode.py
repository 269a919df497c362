"""One C++ kernel per decoder layer for CPU decode steps (T = 1) of plain Llama-family layers, float32 or
weight-only quantized.

MindSpore's CPU backend launches each graph op separately, and a decode step of the 24 M Qwen2 of issue 19 was
~50 ops per layer (RMSNorm ~6, RoPE ~10, q/k/v, casts, cache writes, gate/up, ...): at batch 8 a step was 11.5 ms
wall of which 6.7 ms kernels. `DecodeLayer` does the whole layer in one `ops.Custom(func_type="aot")` call:

    x = rmsnorm(h) ; q, k, v = x Wq^T (+bq), x Wk^T (+bk), x Wv^T (+bv) ; [per-head rmsnorm of q, k (qk_norm)]
    q, k = rope(q), rope(k) at each row's position ; K/V written at the row's slot in place (negative slot: skipped)
    a = softmax(q k^T / sqrt(D)) v over positions 0..position of the row's blocks (kv_cache.py's decode attention)
    h = h + a Wo^T ; x = rmsnorm(h) ; h = h + (silu(x W1^T) * x W3^T) W2^T

float32 throughout (RMSNorm's mean of squares in double), the same formulas as models/llama.py (RMSNorm,
rotate-half RoPE with the engine's cos/sin tables, SwiGLU). The layer is one C++ template (`decode_layer`) over
the kind of matrix, with two entry points:
- `DecodeLayer` (float32 layers): the 7 matrices are packed once at construction into (N/32, K, 32) panels
  (`pack`); each panel is streamed once for all M rows with 8-row x 32-column broadcast-FMA tiles (GCC vector
  extensions). From 8 rows on this runs near one core's FMA peak (~215 GFLOP/s: 16 rows of the 24 M Qwen2's 5.9
  MFLOP per row and layer in 0.44 ms, attention included).
- `DecodeLayerQuant` (layers of 7 `QuantLinear`, int8 / int4, per channel or group-wise, symmetric or asymmetric,
  no act-order): reads each QuantLinear's stored qweight / scales / zeros and dequantizes 16 codes at a time in
  registers (inference/fused_quant.py); nothing is copied, so the decode path holds the quantized bytes only.
e^x (SwiGLU, softmax) is computed 16 lanes at a time (kv_cache.exp16, Cephes' expf polynomial). Trailing rows
without a slot (the padding of a step up to its row bucket) are not computed.

Threads: from PARALLEL_MIN_ROWS rows on, the layer splits its work across `threads` threads of a persistent pool in
the library (inference/cpu_pool.py: std::thread workers, an atomic task counter, no OpenMP): the columns of q/k/v
(one region), wo, w1/w3 with their SwiGLU (one region) and w2, in tasks of 32 columns (quantized tiles: 12 or 8),
and the attention rows. Norms, RoPE and the cache writes stay on the calling thread. Each output element is computed
by one thread with the same code whatever the thread count, so 1, 2 or 3 threads give the same bits (tests).
`threads` = `Engine(..., threads=)`, else $ASCEND_LLM_KERNEL_THREADS, else min(2, CPUs the process may run on); only
1 and 2 were measured (a 2-core machine). Per layer of the 24 M Qwen2 (ctypes harness, one layer's weights
L2/L3-resident, contexts of 75-225 positions, AVX-512 Zen 5, load 1.5-1.8, best of 10-2000 calls), 1 -> 2 threads: 8
rows 0.22 -> 0.12 ms, 16 rows 0.44 -> 0.24 ms, 64 rows 1.81 -> 0.93 ms, 256 rows 7.9-8.4 -> 4.1 ms; 1 row 0.10 ms
(one thread below PARALLEL_MIN_ROWS; 2 threads measured 0.085-0.14 ms depending on the other core's load). When
other processes hold the second core the worker waits for it and a 2-thread call takes about as long as a 1-thread
one (the caller takes every task no worker started). The attention alone (same harness, -march=native both): 3.4 /
4.0 us per row at 16 / 256 rows, against 8.5 / 14.6 us before the register path.

Used by the engine only when every layer is such a block (`supported`; LoRA, FP8, MoE, act-order and
precision-converted cells keep the MindSpore path), on CPU, when g++ builds the library; `Engine(...,
fused_decode=False)` turns it off. Compiled with -march=native for this machine (the CPU's flags are part of the
cached library's name).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.inference.cpu_pool import POOL_SOURCE, kernel_threads
from ascend_llm.inference.fused_quant import QUANT_GEMM_SOURCE, group_sizes, matrix_supported
from ascend_llm.inference.kv_cache import ATTENTION_SOURCE
from ascend_llm.precision.cpu_kernel import compile_library

VECTOR_SOURCE = r"""
// v16 (16 floats) and exp16 come with kv_cache.ATTENTION_SOURCE.
static inline v16 load16(const float *p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
"""

FUSED_SOURCE = r"""
// y[m, n0 .. n0 + width) (+)= x[m, :] W[n0 .., :]^T (+ bias) for MR rows: `panel` is the (K, 32) slice of the
// packed weight (column n0 + c of W^T at panel[k * 32 + c]); each k broadcasts x[m, k] against two 16-wide vectors.
template <int MR>
static inline void panel_tile(const float *x, int64_t K, const float *panel, int64_t n0, int64_t width, float *y,
                              int64_t ldy, const float *bias, bool accumulate) {
  v16 a0[MR], a1[MR];
  for (int i = 0; i < MR; ++i) a0[i] = a1[i] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const v16 w0 = load16(panel + k * 32), w1 = load16(panel + k * 32 + 16);
    for (int i = 0; i < MR; ++i) {
      const v16 xv = v16{} + x[i * K + k];
      a0[i] += xv * w0;
      a1[i] += xv * w1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    float row[32];
    std::memcpy(row, &a0[i], sizeof(v16));
    std::memcpy(row + 16, &a1[i], sizeof(v16));
    float *o = y + i * ldy + n0;
    for (int64_t c = 0; c < width; ++c) {
      const float s = row[c] + (bias ? bias[n0 + c] : 0.0f);
      o[c] = accumulate ? o[c] + s : s;
    }
  }
}

// A float32 weight packed as (ceil(N / 32), K, 32) panels (fused_decode.pack).
struct PackedMatrix {
  const float *panels;
};

// y (M, N) (+)= x (M, K) W^T (+ bias): every panel is read from memory once for all M rows (8 rows at a time from
// L1/L2).
static void panel_rows(const float *x, int64_t M, int64_t K, const float *panel, int64_t n0, int64_t width, float *y,
                       int64_t N, const float *bias, bool accumulate) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) panel_tile<8>(x + m * K, K, panel, n0, width, y + m * N, N, bias, accumulate);
  if (m + 4 <= M) panel_tile<4>(x + m * K, K, panel, n0, width, y + m * N, N, bias, accumulate), m += 4;
  if (m + 2 <= M) panel_tile<2>(x + m * K, K, panel, n0, width, y + m * N, N, bias, accumulate), m += 2;
  if (m < M) panel_tile<1>(x + m * K, K, panel, n0, width, y + m * N, N, bias, accumulate);
}

static inline int64_t col_unit(const PackedMatrix &, int64_t) { return 32; }
static const float *prepare(const PackedMatrix &, const float *x, int64_t, int64_t, std::vector<float> &) { return x; }

// y[:, c0 .. c1) (+)= x (M, K) W^T (+ bias), c0 a multiple of 32: the panels of those columns.
static void gemm_cols(const float *x, int64_t M, int64_t K, const PackedMatrix &W, int64_t N, const float *bias,
                      float *y, bool accumulate, int64_t c0, int64_t c1) {
  c1 = c1 < N ? c1 : N;
  for (int64_t n0 = c0; n0 < c1; n0 += 32)
    panel_rows(x, M, K, W.panels + (n0 / 32) * K * 32, n0, c1 - n0 < 32 ? c1 - n0 : 32, y, N, bias, accumulate);
}

// One matrix product of a layer: y (M, N) (+)= x (M, K) W^T (+ bias).
template <class Matrix>
struct Product {
  const float *x;
  int64_t M, K;
  const Matrix *W;
  int64_t N;
  const float *bias;
  float *y;
  bool accumulate;
};

// Up to 3 products with the same x rows at once (q/k/v; wo; w2), their columns split into tasks of col_unit
// columns across `threads`.
template <class Matrix>
static void products(int threads, std::initializer_list<Product<Matrix>> list) {
  Product<Matrix> p[3];
  const float *xs[3];
  int64_t unit[3], first[4] = {0, 0, 0, 0};
  thread_local std::vector<float> split[3];
  int n = 0;
  for (const Product<Matrix> &one : list) {
    p[n] = one;
    xs[n] = prepare(*one.W, one.x, one.M, one.K, split[n]);
    unit[n] = col_unit(*one.W, one.M);
    first[n + 1] = first[n] + (one.N + unit[n] - 1) / unit[n];
    ++n;
  }
  auto task = [&](int64_t t) {
    int j = 0;
    while (t >= first[j + 1]) ++j;
    const int64_t c0 = (t - first[j]) * unit[j];
    gemm_cols(xs[j], p[j].M, p[j].K, *p[j].W, p[j].N, p[j].bias, p[j].y, p[j].accumulate, c0, c0 + unit[j]);
  };
  parallel(threads, first[n], task);
}

static inline int64_t lcm(int64_t a, int64_t b) {
  int64_t x = a, y = b;
  while (y) x %= y, std::swap(x, y);
  return a / x * b;
}

// g (M, F) = silu(x W1^T) * (x W3^T) (u: scratch (M, F)), in tasks of columns: each task computes its columns of
// both products, then their SwiGLU, so the exponentials are split across threads too.
template <class Matrix>
static void swiglu(int threads, const float *x, int64_t M, int64_t K, const Matrix &w1, const Matrix &w3, int64_t F,
                   float *g, float *u) {
  thread_local std::vector<float> split1, split3;
  const float *x1 = prepare(w1, x, M, K, split1), *x3 = prepare(w3, x, M, K, split3);
  const int64_t unit = lcm(col_unit(w1, M), col_unit(w3, M));
  auto task = [&](int64_t t) {
    const int64_t c0 = t * unit, c1 = c0 + unit < F ? c0 + unit : F;
    gemm_cols(x1, M, K, w1, F, nullptr, g, false, c0, c1);
    gemm_cols(x3, M, K, w3, F, nullptr, u, false, c0, c1);
    float e[128];  // e^-g of the task's columns (c1 - c0 <= 96), 16 at a time (exp16)
    for (int64_t m = 0; m < M; ++m) {
      float *gm = g + m * F, *um = u + m * F;
      for (int64_t c = c0; c < c1; ++c) e[c - c0] = -gm[c];
      exp_inplace(e, c1 - c0, 0.0f);
      for (int64_t c = c0; c < c1; ++c) gm[c] = gm[c] / (1.0f + e[c - c0]) * um[c];
    }
  };
  parallel(threads, (F + unit - 1) / unit, task);
}

// y (rows, D) = x * rsqrt(mean(x^2) + eps) * w, row by row (models/llama.py RMSNormKernel; y may be x).
static void rmsnorm(const float *x, int64_t rows, int64_t D, const float *w, float eps, float *y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * D;
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(xr[d]) * xr[d];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / D + eps));
    float *yr = y + r * D;
    for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * inv * w[d];
  }
}

// Rotate-half RoPE in place on x (B, heads, D) at positions (B,): cos/sin rows (max_len, D) of rope_tables.
static void rope(float *x, int64_t B, int64_t heads, int64_t D, const float *cos, const float *sin,
                 const int32_t *positions, int64_t max_len) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b) {
    int64_t p = positions[b];
    p = p < 0 ? 0 : (p >= max_len ? max_len - 1 : p);
    const float *c = cos + p * D, *s = sin + p * D;
    for (int64_t h = 0; h < heads; ++h) {
      float *v = x + (b * heads + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], e = v[i + half];
        v[i] = a * c[i] - e * s[i];
        v[i + half] = e * c[i + half] + a * s[i + half];
      }
    }
  }
}

enum {
  H, POS, SLOT, TABLE, KCACHE, VCACHE, ATTN_NORM, BQ, BK, BV, Q_NORM, K_NORM, FFN_NORM, COS, SIN, CONSTS, NCOMMON
};
enum { WQ, WK, WV, WO, W1, W3, W2 };  // fused_decode.MATRICES order

// The layer, for either kind of matrix (PackedMatrix: float32 panels, QuantMatrix: QuantLinear's codes; each has its
// `gemm_cols`). params[0 .. NCOMMON) as in the enum: h (B, dim), positions/slots (B,) i32, block tables (B, MB) i32,
// caches (NB, BS, Hkv, D) [written in place], norms and biases as models/llama.py holds them, cos/sin (max_len, D),
// consts = [norm eps, has qkv bias, has qk norm, heads, ffn width, threads, rows from which threads are used];
// out (B, dim). With that many rows or more the products' columns and the attention rows are split across the
// threads (Pool); norms, RoPE and the cache writes stay on the caller.
template <class Matrix>
static void decode_layer(void **params, int64_t **shapes, const Matrix *w, float *h) {
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const int64_t rows = shapes[H][0], dim = shapes[H][1];
  const int32_t *slots = static_cast<const int32_t *>(params[SLOT]);
  int64_t B = rows;  // trailing rows without a slot pad the step up to its row bucket: not computed (h unchanged)
  while (B > 0 && slots[B - 1] < 0) --B;
  const int64_t NB = shapes[KCACHE][0], BS = shapes[KCACHE][1], Hkv = shapes[KCACHE][2], D = shapes[KCACHE][3];
  const float *consts = in(CONSTS);
  const int64_t Hq = static_cast<int64_t>(consts[3]), F = static_cast<int64_t>(consts[4]);
  const int64_t MB = shapes[TABLE][1], max_len = shapes[COS][0];
  const int threads = shapes[CONSTS][0] > 6 && B >= static_cast<int64_t>(consts[6]) ? static_cast<int>(consts[5]) : 1;
  const float eps = consts[0];
  const bool bias = consts[1] > 0.5f, qk_norm = consts[2] > 0.5f;
  const int32_t *positions = static_cast<const int32_t *>(params[POS]);
  const int32_t *tables = static_cast<const int32_t *>(params[TABLE]);
  float *kc = static_cast<float *>(params[KCACHE]), *vc = static_cast<float *>(params[VCACHE]);
  thread_local std::vector<float> buf;
  const int64_t nq = Hq * D, nkv = Hkv * D;
  buf.resize(B * (dim + 2 * nq + 2 * nkv + 2 * F));
  float *x = buf.data(), *q = x + B * dim, *k = q + B * nq, *v = k + B * nkv, *att = v + B * nkv, *g = att + B * nq;
  float *u = g + B * F;
  std::memcpy(h, in(H), rows * dim * sizeof(float));
  if (B == 0) return;  // padding only (warm-up)
  rmsnorm(h, B, dim, in(ATTN_NORM), eps, x);
  products<Matrix>(threads, {{x, B, dim, &w[WQ], nq, bias ? in(BQ) : nullptr, q, false},
                             {x, B, dim, &w[WK], nkv, bias ? in(BK) : nullptr, k, false},
                             {x, B, dim, &w[WV], nkv, bias ? in(BV) : nullptr, v, false}});
  if (qk_norm) {
    rmsnorm(q, B * Hq, D, in(Q_NORM), eps, q);
    rmsnorm(k, B * Hkv, D, in(K_NORM), eps, k);
  }
  rope(q, B, Hq, D, in(COS), in(SIN), positions, max_len);
  rope(k, B, Hkv, D, in(COS), in(SIN), positions, max_len);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = slots[b];
    if (s < 0 || s >= NB * BS) continue;
    std::memcpy(kc + s * nkv, k + b * nkv, nkv * sizeof(float));
    std::memcpy(vc + s * nkv, v + b * nkv, nkv * sizeof(float));
  }
  auto attend = [&](int64_t b) {
    thread_local std::vector<float> scores;
    scores.resize(attention_scratch(MB, BS));
    paged_attention_row(b, q, kc, vc, tables, positions, Hq, D, BS, Hkv, MB, scores.data(), att);
  };
  parallel(threads, B, attend);
  products<Matrix>(threads, {{att, B, nq, &w[WO], dim, nullptr, h, true}});
  rmsnorm(h, B, dim, in(FFN_NORM), eps, x);
  swiglu(threads, x, B, dim, w[W1], w[W3], F, g, u);
  products<Matrix>(threads, {{g, B, F, &w[W2], dim, nullptr, h, true}});
}

// float32 layer: params = common, the 7 matrices packed (fused_decode.pack), out.
extern "C" int DecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != NCOMMON + 8) return 1;
  PackedMatrix w[7];
  for (int i = 0; i < 7; ++i) w[i].panels = static_cast<const float *>(params[NCOMMON + i]);
  decode_layer(params, shapes, w, static_cast<float *>(params[NCOMMON + 7]));
  return 0;
}

// Quantized layer: params = common, (qweight uint8, scales float16, zeros uint8 (N, G) or (1,) when symmetric) for
// each of the 7 QuantLinear, group sizes (7,) i32, out. Dtypes and shapes are checked (a mismatch is an error code,
// never a misread).
extern "C" int DecodeLayerQuant(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  if (nparam != NCOMMON + 23) return 1;
  const int32_t *groups = static_cast<const int32_t *>(params[NCOMMON + 21]);
  const float *consts = static_cast<const float *>(params[CONSTS]);
  const int64_t dim = shapes[H][1], D = shapes[KCACHE][3], F = static_cast<int64_t>(consts[4]);
  const int64_t nq = static_cast<int64_t>(consts[3]) * D, nkv = shapes[KCACHE][2] * D;
  const int64_t in_features[7] = {dim, dim, dim, nq, dim, dim, F}, out_features[7] = {nq, nkv, nkv, dim, F, F, dim};
  QuantMatrix w[7];
  for (int i = 0; i < 7; ++i) {
    const int c = NCOMMON + 3 * i;
    if (dtypes && (std::strcmp(dtypes[c], "uint8") || std::strcmp(dtypes[c + 1], "float16") ||
                   std::strcmp(dtypes[c + 2], "uint8")))
      return 2;
    const int64_t N = shapes[c][0], rb = shapes[c][1], G = shapes[c + 1][1], K = in_features[i];
    const bool zeros = ndims[c + 2] == 2;
    if (N != out_features[i] || (rb != K && 2 * rb != K) || shapes[c + 1][0] != N || groups[i] < 1 ||
        G != (K + groups[i] - 1) / groups[i] || (rb != K && groups[i] % 2) ||
        (zeros && (shapes[c + 2][0] != N || shapes[c + 2][1] != G)))
      return 3;
    w[i] = QuantMatrix{static_cast<const uint8_t *>(params[c]), static_cast<const uint16_t *>(params[c + 1]),
                       zeros ? static_cast<const uint8_t *>(params[c + 2]) : nullptr, G, groups[i],
                       rb == K ? 8 : 4};
  }
  decode_layer(params, shapes, w, static_cast<float *>(params[NCOMMON + 22]));
  return 0;
}
"""

PARALLEL_MIN_ROWS = 4  # rows from which the layer uses its threads (1 row: 2 threads gained little, lost under load)

FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-march=native", "-fopenmp-simd", "-ffp-contract=fast", "-pthread")


def _cpu_signature() -> str:
    """The CPU's model name and flags (the library is built with -march=native for this machine)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return hashlib.sha256("\n".join(sorted(set(keep))).encode()).hexdigest()[:16]


@functools.cache
def library_path() -> str | None:
    """The compiled fused-decode library (built on first use), None when no C++ compiler works."""
    source = (f"// cpu {_cpu_signature()}\n{ATTENTION_SOURCE}\n{POOL_SOURCE}\n{VECTOR_SOURCE}\n{QUANT_GEMM_SOURCE}\n"
              f"{FUSED_SOURCE}")
    return compile_library("fused_decode", source, FLAGS)


def _cells(layer: nn.Cell) -> list:
    """The 7 projections of a layer in `MATRICES` order."""
    return [getattr(getattr(layer, name.split(".")[0]), name.split(".")[1]) for name in MATRICES]


def layer_kind(layer: nn.Cell, cfg) -> str | None:
    """"fp32" (7 exact nn.Dense, float32), "quant" (7 `QuantLinear` the kernel reads, fused_quant.matrix_supported),
    or None when the kernel does not implement the layer: RMSNorm norms (float32, the model's eps), no activation,
    biases on q/k/v exactly when cfg.qkv_bias, a FeedForward (no LoRA, FP8, precision-converted or MoE cells, no
    mix of float and quantized projections in one layer)."""
    from ascend_llm.models.llama import FeedForward, RMSNorm

    def norm(cell) -> bool:
        return type(cell) is RMSNorm and cell.weight.dtype == mstype.float32 and cell.eps == cfg.norm_eps

    attn, ffn = getattr(layer, "attention", None), getattr(layer, "feed_forward", None)
    if attn is None or type(ffn) is not FeedForward or not norm(layer.attention_norm) or not norm(layer.ffn_norm):
        return None
    if cfg.qk_norm and not (norm(attn.q_norm) and norm(attn.k_norm)):
        return None
    cells = _cells(layer)
    if all(type(c) is nn.Dense and not c.activation_flag and c.weight.dtype == mstype.float32 for c in cells):
        kind = "fp32"
    elif all(matrix_supported(c) for c in cells):
        kind = "quant"
    else:
        return None
    if any(c.has_bias != bool(cfg.qkv_bias) for c in cells[:3]) or any(c.has_bias for c in cells[3:]):
        return None
    return kind


def supported(model: nn.Cell) -> bool:
    """True when every layer is a plain Llama block the kernel implements (`layer_kind`: float32 or weight-only
    quantized, layers may differ) and the embeddings are float32."""
    if any(layer_kind(layer, model.cfg) is None for layer in model.layers):
        return False
    return model.tok_embeddings.weight.dtype == mstype.float32


MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
            "feed_forward.w2")


def pack(weight: np.ndarray) -> np.ndarray:
    """nn.Dense weight W (N, K) -> panels (ceil(N / 32), K, 32) float32: panel p holds columns 32p.. of W^T (rows
    of W beyond N are zero), the layout the kernel's broadcast-FMA tiles stream."""
    n, k = weight.shape
    panels = -(-n // 32)
    padded = np.zeros((panels * 32, k), np.float32)
    padded[:n] = weight
    return np.ascontiguousarray(padded.reshape(panels, 32, k).transpose(0, 2, 1))


class DecodeLayer(nn.Cell):
    """construct(h (B, dim) f32, i, layer, positions (B,) i32, slots (B,) i32, block_tables (B, MB) i32, key_cache,
    value_cache, cos, sin (max_len, D) f32) -> h after layer i (B, dim) f32; writes its new K/V in place.

    Build only when `library_path()` is not None and `supported(model)`. float32 layers: holds their 7 matrices
    packed for the kernel (`pack`), a copy taken at construction (+1x their fp32 bytes), so build it after the
    weights are final (the engine is built per generate / serve / sample call). Quantized layers: nothing is copied,
    the kernel reads each QuantLinear's qweight / scales / zeros Parameters as stored (inference/fused_quant.py).
    Norm weights and biases are read from `layer` as they are."""

    def __init__(self, model: nn.Cell, threads: int | None = None, parallel_min_rows: int | None = None):
        super().__init__()
        cfg = model.cfg
        self.op = self._custom("DecodeLayer")
        self.quant_op = self._custom("DecodeLayerQuant")
        self.qkv_bias, self.qk_norm = bool(cfg.qkv_bias), bool(cfg.qk_norm)
        self.threads = kernel_threads(threads)
        self.parallel_min_rows = PARALLEL_MIN_ROWS if parallel_min_rows is None else int(parallel_min_rows)
        consts = [cfg.norm_eps, float(self.qkv_bias), float(self.qk_norm), cfg.num_heads, cfg.ffn_hidden_dim,
                  self.threads, self.parallel_min_rows]
        self.consts = Tensor(np.array(consts, np.float32))
        self.absent = Tensor(np.zeros(1, np.float32))
        self.absent_zeros = Tensor(np.zeros(1, np.uint8))
        packed, first, groups = [], [], []
        for i, layer in enumerate(model.layers):
            cells = _cells(layer)
            quantized = layer_kind(layer, cfg) == "quant"
            first.append(-1 if quantized else len(packed))
            groups.append(Tensor(group_sizes(cells)) if quantized else self.absent)
            if not quantized:
                packed += [Parameter(Tensor(pack(c.weight.asnumpy())), name=f"packed.{i}.{name}", requires_grad=False)
                           for name, c in zip(MATRICES, cells)]
        self.packed = ParameterTuple(packed)
        self.first, self.groups = tuple(first), tuple(groups)

    @staticmethod
    def _custom(name: str) -> ops.Custom:
        op = ops.Custom(f"{library_path()}:{name}", out_shape=lambda h, *rest: h, out_dtype=lambda h, *rest: h,
                        func_type="aot")
        op.add_prim_attr("side_effect_mem", True)
        return op

    def _zeros(self, cell):
        if cell.zeros is None:
            return self.absent_zeros
        return cell.zeros

    def construct(self, h, i, layer, positions, slots, block_tables, key_cache, value_cache, cos, sin):
        attn, ffn = layer.attention, layer.feed_forward
        bq, bk, bv = self.absent, self.absent, self.absent
        if self.qkv_bias:
            bq, bk, bv = attn.wq.bias, attn.wk.bias, attn.wv.bias
        q_norm, k_norm = self.absent, self.absent
        if self.qk_norm:
            q_norm, k_norm = attn.q_norm.weight, attn.k_norm.weight
        an, fn = layer.attention_norm.weight, layer.ffn_norm.weight
        j = self.first[i]
        if j < 0:
            wq, wk, wv, wo, w1, w3, w2 = attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w3, ffn.w2
            return self.quant_op(h, positions, slots, block_tables, key_cache, value_cache, an, bq, bk, bv, q_norm,
                                 k_norm, fn, cos, sin, self.consts,
                                 wq.qweight, wq.scales, self._zeros(wq), wk.qweight, wk.scales, self._zeros(wk),
                                 wv.qweight, wv.scales, self._zeros(wv), wo.qweight, wo.scales, self._zeros(wo),
                                 w1.qweight, w1.scales, self._zeros(w1), w3.qweight, w3.scales, self._zeros(w3),
                                 w2.qweight, w2.scales, self._zeros(w2), self.groups[i])
        w = self.packed
        return self.op(h, positions, slots, block_tables, key_cache, value_cache, an, bq, bk, bv, q_norm, k_norm, fn,
                       cos, sin, self.consts, w[j], w[j + 1], w[j + 2], w[j + 3], w[j + 4], w[j + 5], w[j + 6])
