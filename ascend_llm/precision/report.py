"""What each cell computes in after the precision converters: for logs and tests."""

from __future__ import annotations

from mindspore import nn

from ascend_llm.precision.fp8_dense import Fp8Dense
from ascend_llm.precision.policy import PrecisionDense, PrecisionEmbedding, layer_kind


def describe_precision(model: nn.Cell) -> dict[str, str]:
    """{cell path: what it computes in} after the converters, for logs and tests."""
    out = {}
    for path, cell in model.cells_and_names():
        if isinstance(cell, Fp8Dense):
            out[path] = "fp8"
        elif isinstance(cell, (PrecisionDense, PrecisionEmbedding)):
            out[path] = cell.dtype_name
        elif getattr(cell, "precision_dtype", None):
            out[path] = cell.precision_dtype
        elif path and layer_kind(cell) is not None:
            out[path] = "float32"
    return out
