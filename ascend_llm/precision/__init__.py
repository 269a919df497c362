"""Mixed precision: per-layer dtype policies, float16 loss scaling, FP8 emulation, dynamic precision.

Ascend 910B (A2) and 910C (A3) have no FP8 arithmetic (only Ascend 950 does). On them and on CPU, FP8 is
an exact numerics emulation — operands rounded to the FP8 grid, GEMMs in bf16 (Ascend) or fp32 (CPU) — and
never a speed-up. bf16 GEMMs are native on Ascend and emulated on CPU (bf16-rounded operands, fp32 GEMM).

Trainer contract (every builder takes only the `precision` sub-config, a PrecisionConfig; the trainer's code is
train/build.py, train/session.py, train/step.py and train/trainer.py):

    model = build_model(...)    # then the converters of train/build.py, in this fixed order, before compiling:
    apply_attention(model, attention_cfg)
    apply_precision(model, cfg)       # swaps Dense/Embedding for PrecisionDense/PrecisionEmbedding (same Parameters)
    apply_fp8(model, cfg)             # then FP8 (no-op unless cfg.fp8.enabled); keeps Parameter names
    LoRA; apply_param_dtype(model, cfg.param_dtype); tensor and context parallel; recompute
    precision = build_precision_runtime(model, cfg)   # precision/runtime.py: .scaler (LossScaler when
                                      # cfg.loss_scale != "none", else NoLossScaler; same interface) and
                                      # .controller (always an object; does nothing without FP8 layers)

    optimizer over model.trainable_params()     # FP8 state Parameters are non-trainable, so excluded

    inside the compiled micro-batch step:       loss, grads = value_and_grad(scaler.scale(loss_fn(...)))
                                                return scaler.unscale(loss), grads      # grads still scaled
    inside the compiled update step:            grads = scaler.unscale(reduced, accumulated grads)
                                                finite = scaler.adjust(mindspore.amp.all_finite(grads))
                                                (with tensor parallel: adjust(isfinite(global grad norm));
                                                 ZeRO-2: finiteness agreed over the group, parallel/zero.py)
                                                if finite: optimizer(grads, lr)   # overflow: nothing changes
    after each optimizer step (Python):         events = precision.after_step(step)  # overflow event and rung
                                                                                     # changes, a list of dicts
    when logging:                               precision.metrics()
    checkpoint save:                            precision.state_dict()  (str -> np.ndarray: the checkpoint's
                                                "precision" part, precision.safetensors)
    checkpoint load (after the model params):   precision.load_state_dict(d)  (CheckpointError on a missing key)

Notes for the trainer:
- With grad accumulation, call scaler.unscale/adjust once per optimizer step on the accumulated grads.
- FP8 delayed scaling advances once per forward (per micro-batch, like TE's fp8_autocast around each
  forward), evaluation forwards included; FP8 statistics are those of the latest forward/backward.
- An overflow step changes no parameter and no optimizer moment; the LR schedule still advances.
- Write Parameters in place (`ops.assign(param, value)`) once a step function has been compiled:
  `Parameter.set_data` swaps the buffer and an already compiled `ms.jit` function keeps reading the old one.
  The load_state_dict methods here do that, so they may be called before or after compiling.
- Several ranks: with `precision.fp8.reduce_amax` (default) and mindspore.communication initialised with more
  than one rank, every amax is reduced with MAX over the world group inside the graph (AllGather + max: MCCL's
  AllReduce is SUM-only on CPU), so all ranks use the same scales. Checked under msrun with 2 CPU workers.
- `precision.cpu_kernels=auto` builds a small C++ library once (g++, ~/.cache/ascend_llm/kernels;
  $ASCEND_LLM_CACHE moves the root) for the FP8 casts and bf16 rounding on CPU; without a compiler the
  MindSpore-ops path (same bits) is used.
"""

from __future__ import annotations

from ascend_llm.precision.controller import PrecisionController, build_controller
from ascend_llm.precision.fp8 import E4M3, E5M2, FORMATS, Fp8Format, bf16_round, fp8_round
from ascend_llm.precision.fp8_dense import Fp8Dense, apply_fp8, fp8_layers
from ascend_llm.precision.loss_scale import LossScaler, NoLossScaler, build_loss_scaler
from ascend_llm.precision.policy import (
    PrecisionDense,
    PrecisionEmbedding,
    apply_precision,
    resolve_layer_dtypes,
)
from ascend_llm.precision.report import describe_precision
from ascend_llm.precision.scaling import compute_scale, current_scale, delayed_scaling_update

__all__ = [
    "E4M3", "E5M2", "FORMATS", "Fp8Dense", "Fp8Format", "LossScaler", "NoLossScaler", "PrecisionController",
    "PrecisionDense", "PrecisionEmbedding", "apply_fp8", "apply_precision", "bf16_round", "build_controller",
    "build_loss_scaler", "compute_scale", "current_scale", "delayed_scaling_update", "describe_precision",
    "fp8_layers", "fp8_round", "resolve_layer_dtypes",
]
