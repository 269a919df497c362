"""Pure model cells. Nothing here imports precision/ or parallel/."""

from ascend_llm.models.llama import Transformer, build_model, count_params

__all__ = ["Transformer", "build_model", "count_params"]
