"""`QuantLinear`: a Dense layer with weight-only int8/int4 weights (activations stay float).

Parameters (non-trainable, saved in checkpoints under the Dense's name):
  qweight (out, in) uint8 codes for int8, (out, in // 2) uint8 for int4 (two codes per byte, quant/pack.py)
  scales  (out, G) float16;  zeros (out, G) uint8 (asymmetric only; symmetric uses the constant 2**(bits-1))
  g_idx   (in,) int32 (act-order only; otherwise the group of column c is c // group_size)
  bias    (out,) float32 when the Dense had one
w = scale * (code - zero) for the group of each column; y = x @ w^T (+ bias).

What each device does:
- CPU decode steps (one token per sequence) of a plain Llama block whose 7 projections are QuantLinear (contiguous
  groups; int4 groups of an even size): the engine runs the whole layer as one C++ kernel
  (inference/fused_decode.py + fused_quant.py) that reads qweight / scales / zeros as stored and dequantizes 16
  codes at a time in registers; this cell's `construct` is not called there.
- CPU otherwise (prefill, act-order, other models, `fused_decode=False`): the fused C++ kernel of
  quant/cpu_kernel.py (`ops.Custom` "aot", graph and PyNative mode): it reads the stored codes directly and
  dequantizes 4 output rows at a time into an L1-sized float32 scratch, so a call reads 1/4 (int8) or 1/8 (int4)
  of the float32 weight bytes and no float32 copy of the weight is ever held; float32 accumulation. Every row
  count, every group size, act-order and asymmetric grids. Needs a C++ compiler once (g++ or $CXX, cached in
  ~/.cache/ascend_llm/kernels).
- CPU without a compiler, or `kernel="ops"`: dequantize the whole weight in float32 with MindSpore ops on every
  call, then MatMul (correct, slower than float32: a memory saving only).
- Ascend: the weight-quantized batch matmul kernel (aclnnWeightQuantBatchMatmulV2, A16W8 / A16W4, computes
  x @ ((w_signed + offset) * scale) in float16) with signed codes w_signed = code - 2**(bits-1) and
  offset = 2**(bits-1) - zero; the kernel operands are prepared once in `_ascend_operands` (a second, signed and
  transposed copy of the codes; the stored Parameters stay for checkpoints). Act-order g_idx and group sizes that
  do not divide `in` fall back to dequantize + MatMul. This path has not run on hardware here.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ascend_llm.quant.cpu_kernel import build_quant_matmul_op, kernel_available
from ascend_llm.quant.rtn import QuantizedWeight, effective_group_size, num_groups

KERNELS = ("auto", "ops")


def _frozen(name: str, value: np.ndarray) -> Parameter:
    return Parameter(Tensor(value), name=name, requires_grad=False)


class QuantLinear(nn.Cell):
    """y = x @ dequant(W)^T + b for x (..., in) float -> (..., out) in x's dtype.

    qw: the quantized weight (quant/rtn.py); bias: (out,) or None; device: "CPU" / "Ascend" / ... (default: the
    context's device_target); kernel: "auto" (the device's kernel when it has one) or "ops" (dequantize with
    MindSpore ops, the reference path). ValueError for another kernel name."""

    def __init__(self, qw: QuantizedWeight, bias: np.ndarray | None = None, device: str | None = None,
                 kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"QuantLinear: kernel={kernel!r}: allowed: {', '.join(KERNELS)}")
        self.out_channels, self.in_channels = qw.shape
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self.qweight = _frozen("qweight", qw.packed_codes())
        self.scales = _frozen("scales", qw.scales.astype(np.float16))
        self.zeros = None if qw.sym else _frozen("zeros", qw.zeros.astype(np.uint8))
        self.g_idx = None if qw.g_idx is None else _frozen("g_idx", qw.g_idx.astype(np.int32))
        self.column_group = Tensor(qw.group_of_column().astype(np.int32))
        self.has_bias = bias is not None
        self.bias = _frozen("bias", np.asarray(bias, np.float32)) if self.has_bias else None
        device = device or ms.get_context("device_target")
        self.use_kernel = kernel == "auto" and device == "Ascend" and _kernel_supported(qw)
        self.use_cpu_kernel = kernel == "auto" and device == "CPU" and kernel_available(device)
        if self.use_kernel:
            self._ascend_operands(qw)
        if self.use_cpu_kernel:
            self._cpu_operands()

    def _cpu_operands(self) -> None:
        """The fused CPU kernel reads the stored Parameters; absent ones are passed as 1-element placeholders."""
        placeholder = {np.uint8: Tensor(np.zeros(1, np.uint8)), np.int32: Tensor(np.zeros(1, np.int32)),
                       np.float32: Tensor(np.zeros(1, np.float32))}
        self.cpu_zeros = self.zeros if self.zeros is not None else placeholder[np.uint8]
        self.cpu_g_idx = self.g_idx if self.g_idx is not None else placeholder[np.int32]
        self.cpu_bias = self.bias if self.has_bias else placeholder[np.float32]
        group = effective_group_size(self.group_size, self.in_channels)
        meta = [self.bits, self.zeros is not None, self.g_idx is not None, self.has_bias, group]
        self.cpu_meta = Tensor(np.array(meta, np.int32))
        self.cpu_kernel = build_quant_matmul_op()

    def _ascend_operands(self, qw: QuantizedWeight) -> None:
        from mindspore.ops.auto_generate import WeightQuantBatchMatmul

        operands = ascend_operands(qw)
        dtype = ms.int8 if self.bits == 8 else ms.qint4x2
        self.kernel_weight = Tensor(operands.weight, dtype=dtype)
        self.kernel_scale, self.kernel_offset = Tensor(operands.scale), Tensor(operands.offset)
        self.kernel = WeightQuantBatchMatmul(transpose_x=False, transpose_weight=False,
                                             antiquant_group_size=operands.group_size)

    def dequantized_weight(self):
        """(out, in) float32 weight, dequantized from the stored codes."""
        codes = self.qweight.astype(ms.int32)
        if self.bits == 4:
            codes = ops.stack((codes % 16, codes // 16), -1).reshape(self.out_channels, self.in_channels)
        group = self.column_group if self.g_idx is None else self.g_idx
        scale = ops.gather(self.scales.astype(ms.float32), group, 1)
        if self.zeros is None:
            return (codes.astype(ms.float32) - float(2 ** (self.bits - 1))) * scale
        zero = ops.gather(self.zeros.astype(ms.float32), group, 1)
        return (codes.astype(ms.float32) - zero) * scale

    def construct(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_channels)
        if self.use_cpu_kernel:
            xf = x2 if x2.dtype == ms.float32 else x2.astype(ms.float32)
            scales = self.scales if self.scales.dtype == ms.float16 else self.scales.astype(ms.float16)
            y = self.cpu_kernel(xf, self.qweight, scales, self.cpu_zeros, self.cpu_g_idx, self.cpu_bias, self.cpu_meta)
            y = y if x.dtype == ms.float32 else y.astype(x.dtype)
            return y.reshape(shape[:-1] + (self.out_channels,))
        if self.use_kernel:
            y = self.kernel(x2.astype(ms.float16), self.kernel_weight, self.kernel_scale, self.kernel_offset,
                            None, None, None).astype(x.dtype)
        else:
            y = ops.matmul(x2.astype(ms.float32), self.dequantized_weight().T).astype(x.dtype)
        if self.has_bias:
            y = y + self.bias.astype(y.dtype)
        return y.reshape(shape[:-1] + (self.out_channels,))

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight state held by this cell (codes, scales, zeros, g_idx; not bias)."""
        params = (self.qweight, self.scales, self.zeros, self.g_idx)
        return sum(p.asnumpy().nbytes for p in params if p is not None)

    def extend_repr(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        kind = ("WeightQuantBatchMatmul" if self.use_kernel else
                "fused CPU kernel" if self.use_cpu_kernel else "dequantize on the fly")
        return (f"in={self.in_channels}, out={self.out_channels}, int{self.bits} {group}, "
                f"{'sym' if self.sym else 'asym'}, {kind}")


def _kernel_supported(qw: QuantizedWeight) -> bool:
    """The Ascend kernel's per-group mode needs whole groups (in % group_size == 0) in contiguous order; int4
    packs two output channels per byte (out even)."""
    if qw.g_idx is not None or (qw.bits == 4 and qw.shape[0] % 2):
        return False
    groups = num_groups(qw.shape[1], qw.group_size)
    return groups == 1 or qw.shape[1] % qw.group_size == 0


@dataclass(frozen=True)
class AscendOperands:
    """WeightQuantBatchMatmul operands (transpose_weight=False), computing x @ ((weight + offset) * scale):
    weight (in, out) int8 signed codes code - 2**(bits-1), or for int4 (in, out // 2) int8 bytes of two signed
    nibbles, output channel 2j in the low nibble (MindSpore qint4x2, as golden-stick packs it); scale and offset
    (G, out) float16 per group of `group_size` input rows, or (out,) per channel (group_size 0);
    offset = 2**(bits-1) - zero, so weight + offset = code - zero."""

    weight: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    group_size: int


def ascend_operands(qw: QuantizedWeight) -> AscendOperands:
    """Operands of the Ascend weight-quantized matmul for `qw` (pure NumPy; call when _kernel_supported(qw))."""
    half = 2 ** (qw.bits - 1)
    signed = (qw.codes.astype(np.int16) - half).T  # (in, out)
    offset = (half - qw.zeros.astype(np.float32)).T.astype(np.float16)  # (G, out)
    scale = qw.scales.T.astype(np.float16)
    group = 0 if scale.shape[0] == 1 else qw.group_size
    if group == 0:
        scale, offset = scale[0], offset[0]
    if qw.bits == 8:
        weight = signed.astype(np.int8)
    else:
        nib = (signed & 0x0F).astype(np.uint8)
        weight = (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(np.int8)
    return AscendOperands(np.ascontiguousarray(weight), scale, offset, group)
