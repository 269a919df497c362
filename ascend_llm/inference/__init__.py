"""Inference: the paged-KV-cache `Engine`, the one `Scheduler` (continuous batching), per-request `SamplingParams`."""

from ascend_llm.inference.engine import Engine, GenerationResult
from ascend_llm.inference.sampling import RequestError, SamplingParams
from ascend_llm.inference.scheduler import QueueFull, Request, Scheduler, TokenLogprob

__all__ = ["Engine", "GenerationResult", "QueueFull", "Request", "RequestError", "SamplingParams", "Scheduler",
           "TokenLogprob"]
