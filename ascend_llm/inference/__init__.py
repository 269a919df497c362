"""Inference: KV-cache generation engine (`Engine`), per-request sampling (`SamplingParams`)."""

from ascend_llm.inference.engine import Engine, GenerationResult
from ascend_llm.inference.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "SamplingParams"]
