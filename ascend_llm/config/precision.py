"""Precision schema (recipe group `precision/`): compute dtypes per layer, loss scaling, FP8, dynamic control.

A layer's dtype is the precision its GEMM operands are rounded to; weights and optimizer state stay float32
(master weights; `param_dtype=bfloat16` stores the weights in bf16 with float32 master copies in the ZeRO
optimizer) and every layer returns float32, so norms, softmax, RoPE, the residual stream and the loss stay
float32. See `ascend_llm.precision` for the converters that apply this schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ascend_llm.config.checks import in_range, non_negative, one_of, positive
from ascend_llm.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
# Layer kinds a `layer_dtypes` key may name besides sub-cell names and patterns. Norms are listed so a
# request for a low-precision norm gets a clear error rather than being ignored.
KINDS = ("linear", "conv", "embedding", "norm")
FP32_ONLY_KINDS = ("norm",)
FP8_FORMATS = ("hybrid", "e4m3", "e5m2")
FP8_RECIPES = ("delayed", "current")
AMAX_ALGOS = ("max", "most_recent")
GEMM_DTYPES = ("auto", "float32", "bfloat16")
LOSS_SCALES = ("none", "dynamic", "static")
LEVELS = ("fp8", "bf16", "fp32")  # dynamic precision ladder, lowest first


@dataclass
class Fp8Config:
    """FP8 training (TransformerEngine-style). Ascend 910B has no FP8 arithmetic: there this is an exact
    numerics emulation (quantize -> dequantize around bf16 GEMMs), never a speed-up."""

    enabled: bool = False
    format: str = "hybrid"  # hybrid: forward tensors E4M3, gradients E5M2 | e4m3 | e5m2
    recipe: str = "delayed"  # delayed (amax history) | current (per-tensor, just in time)
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # max | most_recent
    margin: int = 0  # scale = (fp8_max / amax) / 2**margin
    skip: list[str] = field(default_factory=lambda: ["output", "tok_embeddings"])  # names/patterns kept out
    dim_multiple: int = 16  # layers whose in/out dims are not multiples of this stay out of FP8
    reduce_amax: bool = True  # MAX-reduce amax over all ranks (world group) when distributed
    gemm_dtype: str = "auto"  # auto: bfloat16 on Ascend, float32 on CPU (the FP8 values are exact in both)

    def validate(self, prefix: str = "precision.fp8") -> None:
        """Raises ConfigError naming the field: format, recipe, amax_compute_algo or gemm_dtype outside the allowed
        sets, amax_history_len or dim_multiple <= 0, margin < 0, or an empty skip pattern."""
        one_of(f"{prefix}.enabled", self.enabled, (True, False))
        one_of(f"{prefix}.format", self.format, FP8_FORMATS)
        one_of(f"{prefix}.recipe", self.recipe, FP8_RECIPES)
        positive(f"{prefix}.amax_history_len", self.amax_history_len)
        one_of(f"{prefix}.amax_compute_algo", self.amax_compute_algo, AMAX_ALGOS)
        non_negative(f"{prefix}.margin", self.margin)
        positive(f"{prefix}.dim_multiple", self.dim_multiple)
        one_of(f"{prefix}.gemm_dtype", self.gemm_dtype, GEMM_DTYPES)
        for i, pattern in enumerate(self.skip):
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"{prefix}.skip[{i}]", pattern, "must be a non-empty sub-cell name or pattern")


@dataclass
class DynamicConfig:
    """Per-layer precision ladder fp8 -> bf16 -> fp32 driven by FP8 statistics (needs fp8.enabled)."""

    enabled: bool = False
    overflow_threshold: float = 1e-3  # fraction of a tensor's values that saturate in FP8
    underflow_threshold: float = 1e-2  # fraction of non-zero values that flush to zero in FP8
    patience: int = 3  # K: promote after this many consecutive steps above a threshold
    clean_steps: int = 50  # M: demote after this many consecutive clean steps
    max_level: str = "fp32"  # highest rung a layer may be promoted to

    def validate(self, prefix: str = "precision.dynamic") -> None:
        """Raises ConfigError naming the field: thresholds outside [0, 1], patience or clean_steps <= 0, or max_level
        other than bf16/fp32."""
        one_of(f"{prefix}.enabled", self.enabled, (True, False))
        in_range(f"{prefix}.overflow_threshold", self.overflow_threshold, 0.0, 1.0)
        in_range(f"{prefix}.underflow_threshold", self.underflow_threshold, 0.0, 1.0)
        positive(f"{prefix}.patience", self.patience)
        positive(f"{prefix}.clean_steps", self.clean_steps)
        one_of(f"{prefix}.max_level", self.max_level, LEVELS[1:])


@dataclass
class PrecisionConfig:
    """Mixed-precision policy. The comments on each field give its unit and allowed values.

    name: label of the recipe (fp32, bf16, fp16, fp8, ...). compute_dtype: default GEMM operand dtype of linear
    layers. loss_scale_value: initial (dynamic) or fixed (static) scale, >= 1; loss_scale_factor: integer
    growth/shrink factor >= 2. Raises ConfigError on validate() for any value outside the allowed sets.
    """

    name: str = "fp32"
    compute_dtype: str = "float32"  # default GEMM dtype of linear layers
    # Dtype of the model's parameters (and so of their gradients). bfloat16: the optimizer keeps float32
    # master weights (Megatron's layout, about 6 + 12/d bytes per parameter with sharding over d ranks).
    param_dtype: str = "float32"
    # Overrides keyed on a layer kind (linear, conv, embedding, norm), a sub-cell name (wq, w2, output,
    # tok_embeddings) or an fnmatch pattern on the full cell path (layers.0.*); the most specific wins.
    layer_dtypes: dict[str, str] = field(default_factory=dict)
    # auto: on CPU, fused C++ kernels (compiled once with g++) for the FP8 casts and the bf16 rounding of the
    # emulation, bit-identical to the MindSpore-ops path; ops: MindSpore ops only (always the case on Ascend).
    cpu_kernels: str = "auto"
    loss_scale: str = "none"  # none | dynamic | static
    loss_scale_value: float = 65536.0
    loss_scale_factor: int = 2
    loss_scale_window: int = 1000  # finite steps before the dynamic scale grows by loss_scale_factor
    fp8: Fp8Config = field(default_factory=Fp8Config)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)

    def validate(self, prefix: str = "precision") -> None:
        """Raises ConfigError naming the field: unknown dtypes, a low-precision norm, loss_scale_factor not an integer
        >= 2, loss_scale_value < 1, dynamic without fp8, float16 layers without loss scaling, or a bad fp8/dynamic
        sub-field."""
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{prefix}.name", self.name, "must be a non-empty label")
        one_of(f"{prefix}.compute_dtype", self.compute_dtype, DTYPES)
        one_of(f"{prefix}.param_dtype", self.param_dtype, PARAM_DTYPES)
        for key, dtype in self.layer_dtypes.items():
            one_of(f"{prefix}.layer_dtypes.{key}", dtype, DTYPES)
            if key in FP32_ONLY_KINDS and dtype != "float32":
                raise ConfigError(f"{prefix}.layer_dtypes.{key}", dtype,
                                  "norms, softmax, RoPE and the loss are kept in float32")
        one_of(f"{prefix}.cpu_kernels", self.cpu_kernels, ("auto", "ops"))
        one_of(f"{prefix}.loss_scale", self.loss_scale, LOSS_SCALES)
        if not isinstance(self.loss_scale_factor, int) or self.loss_scale_factor < 2:
            raise ConfigError(f"{prefix}.loss_scale_factor", self.loss_scale_factor, "must be an integer >= 2")
        if self.loss_scale_value < 1:
            raise ConfigError(f"{prefix}.loss_scale_value", self.loss_scale_value, "must be >= 1")
        positive(f"{prefix}.loss_scale_window", self.loss_scale_window)
        self.fp8.validate(f"{prefix}.fp8")
        self.dynamic.validate(f"{prefix}.dynamic")
        if self.dynamic.enabled and not self.fp8.enabled:
            raise ConfigError(f"{prefix}.dynamic.enabled", True, "needs precision.fp8.enabled=true")
        if "float16" in self.dtypes_used() and self.loss_scale == "none":
            raise ConfigError(f"{prefix}.loss_scale", self.loss_scale,
                              "float16 layers need loss scaling: use dynamic or static")

    def dtypes_used(self) -> set[str]:
        """Every GEMM dtype the recipe names: compute_dtype and the layer_dtypes values."""
        return {self.compute_dtype, *self.layer_dtypes.values()}
