"""Optional fused CPU kernels for the FP8 cast and the bf16 rounding: one pass over memory instead of ~15
MindSpore elementwise ops.

The portable path (`fp8.round_to_grid`, MindSpore ops) runs everywhere, in graph mode, and is the reference;
on CPU each of its ops is a full memory pass, so FP8 emulation would cost about as much as the GEMMs it
wraps, and each delayed-scaling update is ~30 scalar ops of ~0.1 ms each. This module compiles a small C++
library (MindSpore `ops.Custom(func_type="aot")`, g++, vectorized with `omp simd` but single-threaded) that
does the same saturating cast *and* the layer statistics in one pass, and the scaling update in one call.
No OpenMP thread team: started from inside MindSpore's runtime threads, its parallel regions cost ~20 ms a
call in a training step (tiny model, bf16: 49 calls, 1.2 s per step of kernel time; 28 ms with one OpenMP
thread, measured with MindSpore's CPU profiler on a shared 2-core machine). It is bit-identical to the
portable path and to ml_dtypes (tests check both). It is used only on CPU, only when a C++ compiler is found
(`precision.cpu_kernels=auto`), and compiled once into ~/.cache/ascend_llm/kernels (ASCEND_LLM_CACHE
overrides the root).

FP8 casts (`fp8_e4m3_cast`, `fp8_e5m2_cast`): inputs x (float32, any shape) and scale (float32, one
element); outputs q = fp8_round(x * scale) (saturating) and stats = [max |x| (NaN ignored, like MindSpore's
max reduction), fraction of |x*scale| > fp8 max, fraction of x != 0 with |x*scale| <= min subnormal / 2
(flushed to zero)]. With a third input `level` (dynamic precision) the first output is the operand of the
layer's rung instead: the FP8 values, bf16(x) or x. `fp8_delayed_update`: see `DelayedScalingUpdate`.
`bf16_round`: float32 -> bfloat16 -> float32, RNE.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ascend_llm.precision.fp8 import Fp8Format

logger = logging.getLogger("ascend_llm.precision")

SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
// MindSpore's CPU threads may run with flush-to-zero / denormals-are-zero set; the kernels need IEEE
// semantics (a float32-subnormal input is not zero), so the kernel clears both bits for the loop.
struct IeeeMode {
  unsigned saved;
  IeeeMode() : saved(_mm_getcsr()) { _mm_setcsr(saved & ~0x8040u); }
  ~IeeeMode() { _mm_setcsr(saved); }
};
#else
struct IeeeMode {};
#endif

static int64_t numel(int *ndims, int64_t **shapes, int i) {
  int64_t n = 1;
  for (int d = 0; d < ndims[i]; ++d) n *= shapes[i][d];
  return n;
}

static inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

static inline float float_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

static inline float bf16_of(float v) {
  const uint32_t u = bits_of(v);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return float_of(nan ? (u | 0x00400000u) : ((u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u));
}

// params: x, scale[, level], q, stats. With a level input (dynamic precision) the first output is the
// operand of the layer's rung: 0 -> the FP8 values (scaled domain), 1 -> bf16(x), 2 -> x; the statistics
// are always those of the FP8 cast. The loop is branch-free so that it vectorizes (SSE2 baseline).
template <int M, int EMIN>
static int fp8_cast(int nparam, void **params, int *ndims, int64_t **shapes) {
  if (nparam != 4 && nparam != 5) return 1;
  const bool leveled = nparam == 5;
  const float *x = static_cast<const float *>(params[0]);
  const float scale = *static_cast<const float *>(params[1]);
  const float level = leveled ? *static_cast<const float *>(params[2]) : 0.0f;
  float *q = static_cast<float *>(params[leveled ? 3 : 2]);
  float *stats = static_cast<float *>(params[leveled ? 4 : 3]);
  const int rung = level < 0.5f ? 0 : (level < 1.5f ? 1 : 2);
  const int64_t n = numel(ndims, shapes, 0);
  const float max_value = M == 3 ? 448.0f : 57344.0f;
  const float min_normal = std::ldexp(1.0f, EMIN);
  const float sub_up = std::ldexp(1.0f, M - EMIN);      // 1 / subnormal spacing
  const float sub_step = std::ldexp(1.0f, EMIN - M);    // subnormal spacing
  const float half_sub = 0.5f * sub_step;
  const float magic = 8388608.0f;                       // 2**23: (t + magic) - magic rounds t half-to-even
  const uint32_t shift = 23 - M;
  const uint32_t mask = ~((1u << shift) - 1u);
  const uint32_t half = (1u << (shift - 1)) - 1u;
  float amax = 0.0f;
  int64_t overflow = 0, underflow = 0;
  {
    IeeeMode ieee;
#pragma omp simd reduction(max : amax) reduction(+ : overflow, underflow)
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i];
      const uint32_t vmag = bits_of(v) & 0x7fffffffu;
      const float av = float_of(vmag);
      amax = av > amax ? av : amax;  // NaN compares false: ignored, like MindSpore's max reduction
      const float xs = v * scale;
      const uint32_t bits = bits_of(xs);
      const uint32_t mag = bits & 0x7fffffffu;
      const float a = float_of(mag);
      const float normal = float_of((mag + half + ((mag >> shift) & 1u)) & mask);  // RNE on M mantissa bits
      const float sub = ((a * sub_up + magic) - magic) * sub_step;               // fixed subnormal spacing
      float r = a < min_normal ? sub : normal;
      r = r > max_value ? max_value : r;                                         // saturate (inf too)
      const uint32_t out = mag > 0x7f800000u ? bits : (bits_of(r) | (bits & 0x80000000u));
      overflow += a > max_value ? 1 : 0;
      underflow += (vmag != 0u && a <= half_sub) ? 1 : 0;
      const float fp8 = float_of(out);
      q[i] = rung == 0 ? fp8 : (rung == 1 ? bf16_of(v) : v);
    }
  }
  stats[0] = amax;
  stats[1] = n ? static_cast<float>(static_cast<double>(overflow) / n) : 0.0f;
  stats[2] = n ? static_cast<float>(static_cast<double>(underflow) / n) : 0.0f;
  return 0;
}

extern "C" int fp8_e4m3_cast(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return fp8_cast<3, -6>(nparam, params, ndims, shapes);
}

extern "C" int fp8_e5m2_cast(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return fp8_cast<2, -14>(nparam, params, ndims, shapes);
}

// One step of TransformerEngine's delayed scaling (scaling.py has the formula and the MindSpore-ops version),
// as one tiny kernel instead of ~30 MindSpore scalar ops per cast. params: history (L), scale (1), stats (3;
// stats[0] is this step's amax), consts (3: fp8 max, 2**margin, 1 for amax_compute_algo "max" else 0),
// new history (L), new scale (1). IEEE arithmetic in float32, the same operations in the same order.
extern "C" int fp8_delayed_update(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  if (nparam != 6) return 1;
  const float *history = static_cast<const float *>(params[0]);
  const float scale = *static_cast<const float *>(params[1]);
  const float amax = static_cast<const float *>(params[2])[0];
  const float *consts = static_cast<const float *>(params[3]);
  float *new_history = static_cast<float *>(params[4]);
  float *new_scale = static_cast<float *>(params[5]);
  const int64_t length = numel(ndims, shapes, 0);
  IeeeMode ieee;
  const float head = history[0] >= amax ? history[0] : amax;  // NaN amax is kept (compare is false)
  float used = head;
  if (consts[2] > 0.5f && length > 1) {
    bool nan = std::isnan(head);
    for (int64_t i = 1; i < length; ++i) {
      nan = nan || std::isnan(history[i]);
      used = history[i] > used ? history[i] : used;
    }
    if (nan) used = std::nanf("");
  }
  float sf = (consts[0] / used) / consts[1];
  sf = used > 0.0f ? sf : scale;
  sf = std::isfinite(used) ? sf : scale;
  *new_scale = std::isinf(sf) ? 3.4028234663852886e38f : sf;
  new_history[0] = 0.0f;  // roll(history, -1), then slot 0 = 0: [0, h2, ..., h(L-1), head]
  if (length > 1) {
    for (int64_t i = 1; i + 1 < length; ++i) new_history[i] = history[i + 1];
    new_history[length - 1] = head;
  }
  return 0;
}

// float32 -> bfloat16 -> float32, round to nearest even; NaN stays NaN, overflow goes to inf.
extern "C" int bf16_round(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 2) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = numel(ndims, shapes, 0);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = bf16_of(x[i]);
  return 0;
}
"""

FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd", "-fno-fast-math")


def cache_dir() -> Path:
    """Directory of the compiled kernels: $ASCEND_LLM_CACHE (default ~/.cache/ascend_llm) / kernels."""
    return Path(os.environ.get("ASCEND_LLM_CACHE", "~/.cache/ascend_llm")).expanduser() / "kernels"


@functools.lru_cache(maxsize=1)
def library_path() -> str | None:
    """Path of the compiled kernel library, building it on first use; None when no compiler works."""
    return compile_library("fp8_cast", SOURCE, FLAGS)


@functools.cache
def compile_library(stem: str, source: str, flags: tuple[str, ...]) -> str | None:
    """Build C++ `source` with g++ (or $CXX) and `flags` into cache_dir()/<stem>_<hash of source+flags>.so once
    (atomic rename: concurrent builders agree); returns its path, or None when no compiler works (logged)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{stem}_{digest}.so"
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / f"{stem}.cc"
        src.write_text(source)
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *flags, "-o", str(out), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            logger.info("C++ CPU kernel %s not built (%s); using MindSpore ops", stem, proc.stderr.strip()[:200])
            return None
        os.replace(out, target)
    return str(target)


def fused_available(device: str | None = None) -> bool:
    """True when `device` (default: the context's device_target) is CPU and the kernel library builds (the first
    call compiles it with g++ unless it is cached)."""
    return (device or ms.get_context("device_target")) == "CPU" and library_path() is not None


def build_cast_op(spec: Fp8Format) -> ops.Custom:
    """(x, scale) -> (q, stats (3,)) for `spec`; call only when fused_available()."""
    func = f"{library_path()}:fp8_{spec.name}_cast"
    return ops.Custom(func, out_shape=lambda x, s: (x, [3]), out_dtype=lambda x, s: (x, x), func_type="aot")


def build_leveled_cast_op(spec: Fp8Format) -> ops.Custom:
    """(x, scale, level) -> (operand of the rung: FP8 values / bf16(x) / x, stats of the FP8 cast)."""
    func = f"{library_path()}:fp8_{spec.name}_cast"
    return ops.Custom(func, out_shape=lambda x, s, lv: (x, [3]), out_dtype=lambda x, s, lv: (x, x),
                      func_type="aot")


class DelayedScalingUpdate(nn.Cell):
    """`scaling.delayed_scaling_update` as one fused CPU kernel: (history (L,), scale (), stats (3,) whose
    stats[0] is this step's amax) -> (new history (L,), new scale ()), float32, bit-identical to the
    MindSpore-ops version (TransformerEngine's formula, IEEE float32). Call only when fused_available()."""

    def __init__(self, fp8_max: float, margin: int, algo: str):
        super().__init__()
        self.consts = ms.Tensor(np.array([fp8_max, 2.0 ** margin, 1.0 if algo == "max" else 0.0], np.float32))
        self.op = ops.Custom(f"{library_path()}:fp8_delayed_update", out_shape=lambda h, s, st, c: (h, s),
                             out_dtype=lambda h, s, st, c: (h, s), func_type="aot")

    def construct(self, history, scale, stats):
        """(history (L,), scale (), stats (3,)) float32 -> (new history (L,), new scale ())."""
        return self.op(history, scale, stats, self.consts)


def build_bf16_op() -> ops.Custom:
    """x -> x rounded to bfloat16 (float32 values, RNE); call only when fused_available()."""
    return ops.Custom(f"{library_path()}:bf16_round", out_shape=lambda x: x, out_dtype=lambda x: x,
                      func_type="aot")
