"""Per-layer precision policy: resolve a dtype for every linear/conv/embedding cell, then swap in cells that
compute in it (`apply_precision`).

A layer's dtype is the precision of its GEMM operands. Weights stay float32 Parameters (master weights, so
the optimizer state is float32 too; `precision.param_dtype`, applied later by `param_dtype.py`, is the one
exception). A converted layer returns its GEMM's own output dtype: on Ascend (native bf16/fp16 MatMul) the
compute dtype, so the next GEMM input, SwiGLU's intermediates, q/k/v and the attention output are kept once in
bf16/fp16 for the backward instead of as float32 copies (issue 23: what a bf16 MatMul returns carries no more
than bf16, so casting it to float32 only doubled the saved bytes); where the GEMM is emulated or float32
accumulates (bf16 on CPU) it returns float32. Norms and softmax compute in float32 whatever their input, and
the residual stream stays float32: `x + layer(x)` promotes a bf16 branch to float32 (the logits are cast to
float32 by the model).

- float16: native cast + fp16 MatMul (works on CPU and Ascend); needs loss scaling.
- bfloat16: native bf16 MatMul on Ascend. On CPU, where bf16 MatMul has no kernel, it is *emulated*: every
  GEMM operand — x and w in the forward, the output gradient, w and x in the backward (a custom bprop) — is
  rounded to bf16 (exact round-to-nearest-even, by a cast there and back) and the GEMM runs in fp32 with an
  fp32 result (Ascend's bf16 MatMul returns bf16; the emulation keeps the fp32 accumulator).
- float32: the layer is left as it is.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter

import mindspore as ms
from mindspore import Parameter, nn, ops

from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.precision.cells import replace_cell, sync_parameter_names
from ascend_llm.precision.cpu_kernel import build_bf16_op, fused_available
from ascend_llm.precision.fp8 import bf16_round

logger = logging.getLogger("ascend_llm.precision")

MS_DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}


def is_dense(cell: nn.Cell) -> bool:
    """True for nn.Dense and PrecisionDense (the cells precision converters treat as linear layers)."""
    return isinstance(cell, (nn.Dense, PrecisionDense))


def layer_kind(cell: nn.Cell) -> str | None:
    """linear, conv, embedding, norm or experts (MoE GroupedExperts) for the cells a policy can key on; None for
    containers and others."""
    from ascend_llm.models.llama import Embedding, RMSNorm
    from ascend_llm.models.moe import GroupedExperts

    if is_dense(cell):
        return "linear"
    if isinstance(cell, GroupedExperts):  # MoE experts: their batched GEMMs run in the resolved dtype
        return "experts"
    if isinstance(cell, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(cell, (Embedding, PrecisionEmbedding, nn.Embedding)):
        return "embedding"
    if isinstance(cell, (RMSNorm, nn.LayerNorm)):
        return "norm"
    return None


def _specificity(pattern: str) -> tuple[int, int]:
    """Longer literal text first: `layers.0.attention.wq` beats `layers.*.attention.wq` beats `layers.*`."""
    return (len(pattern.replace("*", "").replace("?", "")), len(pattern))


def resolve_dtype(path: str, kind: str, cfg: PrecisionConfig) -> tuple[str, str]:
    """(dtype, rule) for a cell: a full-path pattern, then the sub-cell name, then the kind, then the default."""
    if kind == "norm":
        return "float32", "norms stay float32"
    leaf = path.rsplit(".", 1)[-1]
    patterns = [k for k in cfg.layer_dtypes if "." in k or any(ch in k for ch in "*?[")]
    for pattern in sorted(patterns, key=_specificity, reverse=True):
        if fnmatch.fnmatchcase(path, pattern):
            return cfg.layer_dtypes[pattern], f"layer_dtypes[{pattern}]"
    if leaf in cfg.layer_dtypes:
        return cfg.layer_dtypes[leaf], f"layer_dtypes[{leaf}]"
    if kind in cfg.layer_dtypes:
        return cfg.layer_dtypes[kind], f"layer_dtypes[{kind}]"
    return cfg.compute_dtype, "compute_dtype"


def resolve_layer_dtypes(model: nn.Cell, cfg: PrecisionConfig) -> dict[str, str]:
    """{cell path: dtype} for every linear, conv, embedding and norm cell of the model."""
    out = {}
    for path, cell in model.cells_and_names():
        kind = layer_kind(cell)
        if path and kind is not None:
            out[path] = resolve_dtype(path, kind, cfg)[0]
    return out


class Bf16Gemm(nn.Cell):
    """y = xb @ wb^T on bf16-rounded operands (given), with a backward whose operands are bf16-rounded too."""

    def __init__(self, round_op=None):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.matmul_nn = ops.MatMul()
        self.matmul_tn = ops.MatMul(transpose_a=True)  # no explicit transpose copy of the gradient
        self.round_op = round_op

    def round(self, t):
        """float32 `t` rounded to bfloat16 values (RNE), still float32; fused C++ kernel when given."""
        return self.round_op(t) if self.round_op is not None else bf16_round(t)

    def construct(self, x, w, xb, wb):
        """xb (N, in) @ wb (out, in)^T -> (N, out) float32; x and w are the unrounded operands the gradient flows to."""
        return self.matmul(xb, wb)

    def bprop(self, x, w, xb, wb, out, dout):
        """With gb = bf16(dout): dx = gb @ wb (N, in) and dw = gb^T @ xb (out, in) in fp32, cast to x's and w's dtypes;
        zero gradients for xb and wb."""
        gb = self.round(dout.astype(ms.float32))
        dx = self.matmul_nn(gb, wb)
        dw = self.matmul_tn(gb, xb)
        return dx.astype(x.dtype), dw.astype(w.dtype), ops.zeros_like(xb), ops.zeros_like(wb)


class PrecisionDense(nn.Cell):
    """Dense whose GEMM runs in `dtype` (bf16 emulated where the device has no bf16 MatMul).

    Output dtype: `dtype` when `native_output` and the GEMM is native (Ascend: what its MatMul returns), else
    float32 (the emulated bf16 GEMM keeps its fp32 accumulator; fp16 on CPU keeps today's fp32 hand-off)."""

    def __init__(self, weight: Parameter, bias: Parameter | None, dtype: str, emulate_bf16: bool,
                 bf16_kernel: bool = False, native_output: bool = False):
        super().__init__()
        self.out_channels, self.in_channels = weight.shape
        self.weight = weight
        self.has_bias = bias is not None
        if self.has_bias:
            self.bias = bias
        self.dtype_name = dtype
        self.emulate = dtype == "bfloat16" and emulate_bf16
        self.compute_dtype = MS_DTYPES[dtype]
        self.output_dtype = self.compute_dtype if native_output and not self.emulate else ms.float32
        self.matmul = ops.MatMul(transpose_b=True)
        self.bf16_gemm = Bf16Gemm(build_bf16_op() if self.emulate and bf16_kernel else None)

    def construct(self, x):
        """x (..., in_channels) -> (..., out_channels) in `output_dtype` (bias added in float32). Operands already
        in the compute dtype (bf16 parameters, a bf16 input) are not cast: no per-step weight copy."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_channels)
        if self.emulate:
            x2 = x2.astype(ms.float32)
            xb = ops.stop_gradient(self.bf16_gemm.round(x2))
            wb = ops.stop_gradient(self.bf16_gemm.round(self.weight))
            y = self.bf16_gemm(x2, self.weight, xb, wb)
        else:
            w = self.weight if self.weight.dtype == self.compute_dtype else self.weight.astype(self.compute_dtype)
            xc = x2 if x2.dtype == self.compute_dtype else x2.astype(self.compute_dtype)
            y = self.matmul(xc, w)
        if self.has_bias:
            y = y.astype(ms.float32) + self.bias
        y = y if y.dtype == self.output_dtype else y.astype(self.output_dtype)
        return y.reshape(shape[:-1] + (self.out_channels,))

    def extend_repr(self) -> str:
        """Shape, dtype and whether bf16 is emulated, for `repr(cell)`."""
        mode = " (emulated: bf16-rounded operands, fp32 GEMM)" if self.emulate else ""
        return f"in={self.in_channels}, out={self.out_channels}, dtype={self.dtype_name}{mode}"


class PrecisionEmbedding(nn.Cell):
    """Embedding lookup whose output is rounded to `dtype` (values as a low-precision table would give)."""

    def __init__(self, weight: Parameter, dtype: str):
        super().__init__()
        self.weight = weight
        self.dtype_name = dtype
        self.compute_dtype = MS_DTYPES[dtype]

    def construct(self, tokens):
        """tokens (...) int32/int64 -> (..., dim) float32 whose values are rounded to `dtype` (float16 or bfloat16)."""
        return ops.gather(self.weight, tokens, 0).astype(self.compute_dtype).astype(ms.float32)


def bf16_is_emulated(device: str | None = None) -> bool:
    """True unless `device` (default: the context's device_target) is Ascend, the one with bf16 MatMul."""
    return (device or ms.get_context("device_target")) != "Ascend"


def _converted(cell: nn.Cell, kind: str, dtype: str, emulate: bool, kernel: bool) -> nn.Cell | None:
    if kind == "linear" and not isinstance(cell, PrecisionDense):
        bias = cell.bias if getattr(cell, "has_bias", False) else None
        if getattr(cell, "activation_flag", False):
            return None
        # Ascend (no emulation): hand the GEMM's bf16/fp16 output onward (module doc)
        return PrecisionDense(cell.weight, bias, dtype, emulate, kernel, native_output=not emulate)
    if kind == "experts":  # bf16 emulation (CPU) is not applied to them: kept float32, logged
        if dtype == "bfloat16" and emulate:
            return None
        cell.compute_dtype = MS_DTYPES[dtype]
        return cell
    if kind == "embedding" and hasattr(cell, "weight") and not isinstance(cell, nn.Embedding):
        return PrecisionEmbedding(cell.weight, dtype)
    if kind == "conv":
        actual = "float32" if dtype == "bfloat16" and emulate else dtype
        cell.to_float(MS_DTYPES[actual])
        cell.precision_dtype = actual
        return cell
    return None


def apply_precision(model: nn.Cell, cfg: PrecisionConfig) -> nn.Cell:
    """Swap each linear/embedding cell whose resolved dtype is not float32 for a PrecisionDense /
    PrecisionEmbedding sharing its Parameters; conv cells get `to_float`. Mutates and returns the model.

    Call once after building the model and before compiling, then `apply_fp8`.
    """
    emulate = bf16_is_emulated()
    kernel = emulate and cfg.cpu_kernels == "auto" and "bfloat16" in cfg.dtypes_used() and fused_available()
    cells = dict(model.cells_and_names())
    changed, kept = Counter(), []
    for path, dtype in resolve_layer_dtypes(model, cfg).items():
        cell = cells[path]
        kind = layer_kind(cell)
        if dtype == "float32" or kind == "norm" or isinstance(cell, (PrecisionDense, PrecisionEmbedding)):
            continue  # nothing to do, or converted already (apply_precision is idempotent)
        new = _converted(cell, kind, dtype, emulate, kernel)
        if new is None:
            kept.append(path)
            continue
        if kind == "conv" and dtype == "bfloat16" and emulate:
            logger.info("%s: no bf16 conv kernel on this device; kept float32", path)
        if new is not cell:
            replace_cell(model, path, new)
        changed[f"{kind}:{dtype}"] += 1
    sync_parameter_names(model)
    if changed:
        bf16_emulated = emulate and "bfloat16" in cfg.dtypes_used()
        note = " (bf16 emulated: bf16-rounded operands, fp32 GEMM%s)" % (", fused C++ rounding" if kernel else "")
        note = note if bf16_emulated else ""
        logger.info("precision policy %s: %s; everything else float32%s", cfg.name,
                    ", ".join(f"{n} {k}" for k, n in sorted(changed.items())), note)
    if kept:
        logger.info("precision policy %s: kept float32 (unsupported cell): %s", cfg.name, ", ".join(kept))
    return model
