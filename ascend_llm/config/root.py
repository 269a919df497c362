"""The root recipe: one field per recipe group. Builders receive only their own sub-config."""

from __future__ import annotations

from dataclasses import dataclass, field

from ascend_llm.config.attention import AttentionConfig
from ascend_llm.config.data import DataConfig
from ascend_llm.config.lora import LoraConfig
from ascend_llm.config.model import ModelConfig
from ascend_llm.config.objective import ObjectiveConfig
from ascend_llm.config.optim import OptimConfig
from ascend_llm.config.parallel import (
    ClusterConfig,
    ParallelConfig,
    check_parallel_model,
    check_world_size,
    resolve_data_parallel,
)
from ascend_llm.config.precision import PrecisionConfig
from ascend_llm.config.preference import PREFERENCE_OBJECTIVES, resolve_reference
from ascend_llm.config.runtime import RuntimeConfig
from ascend_llm.config.train import TrainConfig
from ascend_llm.errors import ConfigError


@dataclass
class RecipeConfig:
    """The whole recipe: one sub-config per recipe group. Builders take only their own sub-config;
    `validate()` checks each group and the few rules that span groups (sequence length, vocabulary, batch
    divisibility by the data-parallel degree, model and sequence divisibility by the TP/CP degrees) and
    raises ConfigError naming the field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def validate(self) -> RecipeConfig:
        """Resolve data_parallel_degree=0, validate every group and the cross-group rules; returns self. Raises
        ConfigError naming the first bad field."""
        resolve_data_parallel(self.parallel, self.cluster)
        for name in ("model", "attention", "data", "optim", "train", "runtime", "precision", "parallel", "cluster",
                     "lora", "objective"):
            getattr(self, name).validate(name)
        self._validate_cross_group()
        return self

    def _validate_cross_group(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", self.data.seq_len,
                              f"must be <= model.max_seq_len={self.model.max_seq_len}")
        if self.data.tokenizer is None and self.data.vocab_size > self.model.vocab_size:
            raise ConfigError("data.vocab_size", self.data.vocab_size,
                              f"must be <= model.vocab_size={self.model.vocab_size}")
        check_world_size(self.parallel, self.cluster)
        dp = self.parallel.data_parallel_degree
        per_step = self.train.global_batch_size // self.train.grad_accum_steps
        if per_step % dp:
            raise ConfigError("train.global_batch_size", self.train.global_batch_size,
                              f"global_batch_size/grad_accum_steps={per_step} must be divisible by "
                              f"parallel.data_parallel_degree={dp}")
        check_parallel_model(self.parallel, self.model, self.data.seq_len)
        self._validate_preference()

    def _validate_preference(self) -> None:
        """A preference objective's reference must be one this recipe can provide (config/preference.py
        resolve_reference: adapters_off needs lora.enabled); checked here, so `launch` refuses it before any
        worker starts."""
        if self.objective.name in PREFERENCE_OBJECTIVES:
            resolve_reference(self.objective.name, self.objective.preference, bool(self.lora.enabled))
