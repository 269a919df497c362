"""`precision.param_dtype`: store the trainable weights in bf16 with fp32 master weights in the optimizer
(Megatron's layout, about 6 + 12/d bytes per parameter with ZeRO over d ranks).

`apply_param_dtype` casts the weights of linear and embedding cells (norm weights stay float32, as Megatron
keeps them); the fp32 master copy lives in the sharded optimizer (`parallel/zero.py:ZeroAdamW`, which keeps
`zero_master.*` shards whenever a parameter is not float32), so the session requires parallel.zero_stage >= 1
with it. The CPU backend has no bf16 Assign/StridedSlice kernels, so this runs on Ascend only: on CPU the
session refuses it with one line. It has not yet run on Ascend hardware.
"""

from __future__ import annotations

from mindspore import nn

from ascend_llm.precision.policy import MS_DTYPES


def apply_param_dtype(model: nn.Cell, param_dtype: str) -> nn.Cell:
    """Cast every trainable weight whose name does not contain "norm" to `param_dtype`; returns the model."""
    if param_dtype == "float32":
        return model
    dtype = MS_DTYPES[param_dtype]
    for param in model.trainable_params():
        if "norm" not in param.name:
            param.set_dtype(dtype)
    return model
