"""Typed recipe schemas (one per recipe group): plain dataclasses, no Hydra, no files read. Composition with Hydra
lives in `ascend_llm.compose`."""

from ascend_llm.config.attention import AttentionConfig
from ascend_llm.config.data import DataConfig
from ascend_llm.config.model import ModelConfig
from ascend_llm.config.optim import OptimConfig
from ascend_llm.config.parallel import ClusterConfig, ParallelConfig
from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.config.root import RecipeConfig
from ascend_llm.config.runtime import RuntimeConfig
from ascend_llm.config.train import TrainConfig

__all__ = [
    "AttentionConfig", "ClusterConfig", "DataConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "PrecisionConfig", "RecipeConfig", "RuntimeConfig", "TrainConfig",
]
