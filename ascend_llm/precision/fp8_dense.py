"""`Fp8Dense`: a Dense layer whose GEMMs run on FP8-rounded operands, and the `apply_fp8` converter.

Forward: the input x and the weight w are scaled and rounded to the forward format (E4M3 in HYBRID);
y = (q(x*sx) @ q(w*sw)^T) / (sx*sw). Backward (a custom bprop): the output gradient g is scaled and
rounded to the backward format (E5M2 in HYBRID); dx = (q(g*sg) @ q(w*sw)) / (sg*sw) and
dw = (q(g*sg)^T @ q(x*sx)) / (sg*sx). The FP8 values are exact in bf16 and fp32, so the GEMM runs in bf16
on Ascend and fp32 on CPU with no further rounding of its operands (with fp32 GEMMs the inverse scales are
folded into the smaller weight operand). Ascend 910B has no FP8 arithmetic: this is numerics emulation
there, never a speed-up. The cast is `fp8.round_to_grid` (MindSpore ops, any device) or, on CPU, the fused
C++ kernel of `cpu_kernel.py` (same bits, one memory pass, statistics included); there the delayed-scaling
update of each cast is one kernel call too (`cpu_kernel.DelayedScalingUpdate`).

State, as non-trainable Parameters (so graph-mode steps update them with ops.assign, Python reads them
after the step, and checkpoints can save them), per role r in {x, w, g}:
  fp8_{r}_history (L,)  amax history (delayed scaling; L = 1 for current scaling)
  fp8_{r}_scale   ()    the scale the next cast uses
  fp8_{r}_stats   (3,)  [amax of t (NaN ignored), overflow fraction (|t*s| > fp8 max: saturated),
                        underflow fraction (t != 0 with |t*s| <= min subnormal / 2: flushed to zero)]
                        of the latest cast
  fp8_level       ()    0 = fp8, 1 = bf16, 2 = fp32: the dynamic controller's rung for this layer
Statistics are always measured on the FP8 cast, also when the layer is promoted, so the controller can
see when it is clean again.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.precision.cells import replace_cell, sync_parameter_names, world_size
from ascend_llm.precision.cpu_kernel import DelayedScalingUpdate, build_cast_op, build_leveled_cast_op, fused_available
from ascend_llm.precision.fp8 import FORMATS, Fp8Format, bf16_round, round_to_grid
from ascend_llm.precision.policy import is_dense
from ascend_llm.precision.scaling import current_scale, delayed_scaling_update

logger = logging.getLogger("ascend_llm.precision")

ROLES = ("x", "w", "g")
STAT_NAMES = ("amax", "overflow", "underflow")
EMULATION_NOTE = ("FP8 is numerics emulation here (FP8-rounded operands, GEMMs in {gemm}): Ascend 910B/910C have "
                  "no FP8 arithmetic (only Ascend 950 does), so expect no FP8 speed-up")


@dataclass(frozen=True)
class Fp8Recipe:
    """Resolved, hashable FP8 settings a layer needs at graph-compile time."""

    forward: Fp8Format
    backward: Fp8Format
    delayed: bool
    history_len: int
    amax_algo: str
    margin: int
    reduce_amax: bool
    gemm_bf16: bool
    dynamic: bool
    fused: bool  # fused C++ CPU cast kernel (cpu_kernel.py) instead of the MindSpore-ops cast


def build_fp8_recipe(cfg: PrecisionConfig, device: str | None = None, world_size: int = 1) -> Fp8Recipe:
    """Resolve `cfg.fp8` for `device` (default: the context's device_target) and `world_size` ranks: forward format
    E4M3 unless fp8.format is e5m2, backward E5M2 unless it is e4m3 (hybrid: E4M3 forward, E5M2 backward, as TE);
    bf16 GEMMs only on Ascend and never with dynamic precision (its fp32 rung must be fp32); amax reduced over
    ranks only when world_size > 1; the fused C++ cast when cpu_kernels=auto on CPU with a compiler."""
    fp8 = cfg.fp8
    device = device or ms.get_context("device_target")
    forward = FORMATS["e5m2" if fp8.format == "e5m2" else "e4m3"]
    backward = FORMATS["e4m3" if fp8.format == "e4m3" else "e5m2"]
    gemm_bf16 = fp8.gemm_dtype == "bfloat16" or (fp8.gemm_dtype == "auto" and device == "Ascend")
    if cfg.dynamic.enabled:
        gemm_bf16 = False  # the fp32 rung must really be fp32
    delayed = fp8.recipe == "delayed"
    fused = cfg.cpu_kernels == "auto" and fused_available(device)
    return Fp8Recipe(forward, backward, delayed, fp8.amax_history_len if delayed else 1, fp8.amax_compute_algo,
                     fp8.margin, fp8.reduce_amax and world_size > 1, gemm_bf16 and device == "Ascend",
                     cfg.dynamic.enabled, fused)


def _state(name: str, value: np.ndarray) -> Parameter:
    return Parameter(Tensor(value), name=name, requires_grad=False)


class AmaxAllReduce(nn.Cell):
    """MAX of a scalar over all ranks, as AllGather + max: `ops.AllReduce` supports only SUM on CPU (MCCL),
    while AllGather works on CPU and Ascend alike, and gathering world_size scalars costs the same."""

    def __init__(self):
        super().__init__()
        self.gather = ops.AllGather()

    def construct(self, amax):
        """Scalar float32 amax of this rank -> its maximum over the world group (scalar float32)."""
        return self.gather(amax.reshape(1)).max()


def quantize(t: Tensor, scale: Tensor, history: Tensor, spec: Fp8Format, recipe: Fp8Recipe, reduce_max, cast_op,
             level=None, update=None):
    """Cast `t` (no gradient) to FP8 values in the scaled domain, with the fused CPU kernel when `cast_op`.

    Returns (q, inverse scale, stats (3,), new history, new scale). stats = [amax of t (NaN ignored; all-reduced
    with MAX across ranks when configured), fraction of |t*scale| > fp8 max (saturated), fraction of t != 0
    with |t*scale| <= min subnormal / 2 (flushed to zero)]. `update` (fused CPU path, delayed scaling) is a
    `cpu_kernel.DelayedScalingUpdate`: the history/scale update in one kernel instead of ~30 scalar ops.
    """
    if not recipe.delayed:
        amax = ops.abs(t).max()
        if recipe.reduce_amax:
            amax = reduce_max(amax)
        scale = current_scale(amax, spec.max_value, recipe.margin)
    if cast_op is not None:
        q, stats = cast_op(t, scale) if level is None else cast_op(t, scale, level)
        if recipe.reduce_amax:  # the kernel's stats are already [amax, overflow, underflow]
            stats = ops.concat((reduce_max(stats[0]).reshape(1), stats[1:]))
        amax = stats[0]
    else:
        amax = ops.abs(t).max()
        xs = t * scale
        a = ops.abs(xs)
        q = round_to_grid(xs, a < spec.min_normal, spec, True, t)
        overflow = (a > spec.max_value).astype(ms.float32).mean()
        underflow = ops.logical_and(t != 0.0, a <= spec.min_subnormal * 0.5).astype(ms.float32).mean()
        if recipe.reduce_amax:
            amax = reduce_max(amax)
        stats = ops.stack((amax, overflow, underflow))
    if recipe.delayed and update is not None:
        history, new_scale = update(history, scale, stats)
    elif recipe.delayed:
        history, new_scale = delayed_scaling_update(history, scale, amax, spec.max_value, recipe.margin,
                                                    recipe.amax_algo)
    else:
        history, new_scale = amax.reshape(1), scale
    return q, 1.0 / scale, stats, history, new_scale


def build_update(recipe: Fp8Recipe, spec: Fp8Format) -> DelayedScalingUpdate | None:
    """The fused delayed-scaling update for casts to `spec`, or None (MindSpore ops) off the fused CPU path."""
    if not (recipe.fused and recipe.delayed):
        return None
    return DelayedScalingUpdate(spec.max_value, recipe.margin, recipe.amax_algo)


def select_level(level: Tensor, q: Tensor, inv: Tensor, t: Tensor):
    """Operand and inverse scale for the layer's rung: fp8 (q, inv), bf16 (round(t), 1) or fp32 (t, 1).
    (The fused CPU kernel does this selection itself, in the same pass as the cast.)"""
    is_fp8 = level < 0.5
    operand = ops.where(is_fp8, q, ops.where(level < 1.5, bf16_round(t), t))
    return operand, ops.where(is_fp8, inv, ops.ones_like(inv))


class Fp8Gemm(nn.Cell):
    """y = (ox @ ow^T) * inv_xw with a custom backward that rounds the output gradient to FP8.

    Holds no Parameters (a bprop may not use them): the gradient's scaling state comes in as inputs and is
    updated with ops.assign from the bprop.
    """

    def __init__(self, recipe: Fp8Recipe):
        super().__init__()
        self.recipe = recipe
        self.reduce_max = AmaxAllReduce() if recipe.reduce_amax else None
        self.matmul_nn, self.matmul_nt = ops.MatMul(), ops.MatMul(transpose_b=True)
        self.matmul_tn = ops.MatMul(transpose_a=True)
        self.cast_op = build_cast_op(recipe.backward) if recipe.fused else None
        if recipe.fused and recipe.dynamic:
            self.cast_op = build_leveled_cast_op(recipe.backward)
        self.update = build_update(recipe, recipe.backward)

    def matmul(self, a: Tensor, b: Tensor, transpose_a: bool, transpose_b: bool) -> Tensor:
        """MatMul primitives with transpose flags: no explicit transpose copies of activations/gradients."""
        if self.recipe.gemm_bf16:
            a, b = a.astype(ms.bfloat16), b.astype(ms.bfloat16)
        if transpose_a:
            return self.matmul_tn(a, b).astype(ms.float32)
        if transpose_b:
            return self.matmul_nt(a, b).astype(ms.float32)
        return self.matmul_nn(a, b).astype(ms.float32)

    def construct(self, x, w, ox, ow, inv_x, inv_w, g_history, g_scale, g_stats, level):
        """x (N, in) and w (out, in) float32 carry the gradient; ox (N, in) and ow (out, in) are their FP8-valued
        operands, inv_x and inv_w () the inverse scales. Returns (N, out) float32, (ox @ ow^T) * inv_x * inv_w."""
        if self.recipe.gemm_bf16:  # the FP8 values are exact in bf16; the scales are applied after the GEMM
            return self.matmul(ox, ow, False, True) * (inv_x * inv_w)
        # fp32 GEMM: fold both inverse scales into the (smaller) weight operand instead of the output
        return self.matmul(ox, ow * (inv_x * inv_w), False, True)

    def bprop(self, x, w, ox, ow, inv_x, inv_w, g_history, g_scale, g_stats, level, out, dout):
        """dx (N, in) = (q(g*sg) @ ow) * inv_g * inv_w and dw (out, in) = (q(g*sg)^T @ ox) * inv_g * inv_x; updates the
        g-cast state (history, scale, stats) with ops.assign; zero gradients for every other input."""
        g = ops.stop_gradient(dout.astype(ms.float32))
        spec = self.recipe.backward
        leveled = self.recipe.fused and self.recipe.dynamic
        qg, inv_g, stats, history, scale = quantize(g, g_scale, g_history, spec, self.recipe, self.reduce_max,
                                                    self.cast_op, level if leveled else None, self.update)
        ops.assign(g_stats, stats)
        ops.assign(g_history, history)
        ops.assign(g_scale, scale)
        if leveled:
            inv_g = ops.where(level < 0.5, inv_g, ops.ones_like(inv_g))
        elif self.recipe.dynamic:
            qg, inv_g = select_level(level, qg, inv_g, g)
        if self.recipe.gemm_bf16:
            dx = self.matmul(qg, ow, False, False) * (inv_g * inv_w)
        else:
            dx = self.matmul(qg, ow * (inv_g * inv_w), False, False)
        dw = self.matmul(qg, ox, True, False) * (inv_g * inv_x)
        return (dx.astype(x.dtype), dw.astype(w.dtype), ops.zeros_like(ox), ops.zeros_like(ow),
                ops.zeros_like(inv_x), ops.zeros_like(inv_w), ops.zeros_like(g_history), ops.zeros_like(g_scale),
                ops.zeros_like(g_stats), ops.zeros_like(level))


class Fp8Dense(nn.Cell):
    """Drop-in replacement for a Dense layer (shares its weight and bias Parameters)."""

    def __init__(self, weight: Parameter, bias: Parameter | None, recipe: Fp8Recipe):
        super().__init__()
        self.out_channels, self.in_channels = weight.shape
        self.weight = weight
        self.has_bias = bias is not None
        if self.has_bias:
            self.bias = bias
        self.recipe = recipe
        self.reduce_max = AmaxAllReduce() if recipe.reduce_amax else None
        length = recipe.history_len
        for role in ROLES:
            setattr(self, f"fp8_{role}_history", _state(f"fp8_{role}_history", np.zeros(length, np.float32)))
            setattr(self, f"fp8_{role}_scale", _state(f"fp8_{role}_scale", np.float32(1.0)))
            setattr(self, f"fp8_{role}_stats", _state(f"fp8_{role}_stats", np.zeros(3, np.float32)))
        self.fp8_level = _state("fp8_level", np.float32(0.0))
        self.gemm = Fp8Gemm(recipe)
        self.cast_op = build_cast_op(recipe.forward) if recipe.fused else None
        if recipe.fused and recipe.dynamic:
            self.cast_op = build_leveled_cast_op(recipe.forward)
        self.update = build_update(recipe, recipe.forward)

    @classmethod
    def from_dense(cls, dense: nn.Cell, recipe: Fp8Recipe) -> Fp8Dense:
        """An Fp8Dense sharing `dense`'s weight (out, in) and bias (out,) Parameters."""
        return cls(dense.weight, dense.bias if getattr(dense, "has_bias", False) else None, recipe)

    def _cast(self, t, history, scale, stats):
        spec = self.recipe.forward
        leveled = self.recipe.fused and self.recipe.dynamic
        q, inv, new_stats, new_history, new_scale = quantize(t, scale, history, spec, self.recipe, self.reduce_max,
                                                             self.cast_op, self.fp8_level if leveled else None,
                                                             self.update)
        ops.assign(stats, new_stats)
        ops.assign(history, new_history)
        ops.assign(scale, new_scale)
        if leveled:
            inv = ops.where(self.fp8_level < 0.5, inv, ops.ones_like(inv))
        elif self.recipe.dynamic:
            q, inv = select_level(self.fp8_level, q, inv, t)
        return q, inv

    def construct(self, x):
        """x (..., in_channels), any float dtype -> (..., out_channels) float32; updates the x/w cast state
        Parameters (history, scale, stats) as a side effect."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_channels).astype(ms.float32)
        ox, inv_x = self._cast(ops.stop_gradient(x2), self.fp8_x_history, self.fp8_x_scale, self.fp8_x_stats)
        ow, inv_w = self._cast(ops.stop_gradient(self.weight), self.fp8_w_history, self.fp8_w_scale,
                               self.fp8_w_stats)
        y = self.gemm(x2, self.weight, ox, ow, inv_x, inv_w, self.fp8_g_history, self.fp8_g_scale,
                      self.fp8_g_stats, self.fp8_level)
        if self.has_bias:
            y = y + self.bias
        return y.reshape(shape[:-1] + (self.out_channels,))

    def extend_repr(self) -> str:
        """Shape, formats, scaling recipe and dynamic flag for `repr(cell)`."""
        r = self.recipe
        return (f"in={self.in_channels}, out={self.out_channels}, fwd={r.forward.name}, bwd={r.backward.name}, "
                f"{'delayed' if r.delayed else 'current'} scaling, dynamic={r.dynamic}")


def fp8_layers(model: nn.Cell) -> dict[str, Fp8Dense]:
    """Every Fp8Dense in the model by its cell path."""
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, Fp8Dense)}


def is_skipped(path: str, patterns) -> bool:
    """True when the leaf name or the full cell path matches one of the fnmatch `patterns` (precision.fp8.skip)."""
    leaf = path.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(leaf, p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def fp8_candidates(model: nn.Cell, cfg: PrecisionConfig) -> tuple[list[str], dict[str, str]]:
    """(paths to convert, {path: reason} for dense layers left out)."""

    convert, skipped = [], {}
    for path, cell in model.cells_and_names():
        if not path or not is_dense(cell):
            continue
        out_dim, in_dim = cell.weight.shape
        if is_skipped(path, cfg.fp8.skip):
            skipped[path] = "in precision.fp8.skip"
        elif in_dim % cfg.fp8.dim_multiple or out_dim % cfg.fp8.dim_multiple:
            skipped[path] = f"dims {in_dim}x{out_dim} not multiples of {cfg.fp8.dim_multiple}"
        elif getattr(cell, "activation_flag", False):
            skipped[path] = "has a fused activation"
        else:
            convert.append(path)
    return convert, skipped


def apply_fp8(model: nn.Cell, cfg: PrecisionConfig) -> nn.Cell:
    """Swap eligible Dense layers for Fp8Dense in place (no-op unless cfg.fp8.enabled); returns the model.

    Call after `apply_precision` and before compiling: non-FP8 layers keep the policy's dtype.
    """
    if not cfg.fp8.enabled:
        return model

    recipe = build_fp8_recipe(cfg, world_size=world_size())
    convert, skipped = fp8_candidates(model, cfg)
    cells = dict(model.cells_and_names())
    for path in convert:
        replace_cell(model, path, Fp8Dense.from_dense(cells[path], recipe))
    sync_parameter_names(model)
    gemm = "bf16" if recipe.gemm_bf16 else "fp32"
    gemm += ", fused C++ cast kernel" if recipe.fused else ", MindSpore-ops cast"
    logger.info("FP8 (%s fwd / %s bwd, %s scaling, amax history %d, margin %d) on %d layers; kept out: %s",
                recipe.forward.name, recipe.backward.name, "delayed" if recipe.delayed else "current",
                recipe.history_len, recipe.margin, len(convert),
                ", ".join(f"{p} ({why})" for p, why in skipped.items()) or "none")
    logger.info(EMULATION_NOTE.format(gemm=gemm))
    return model
