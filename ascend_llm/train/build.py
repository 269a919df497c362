"""Build the model and apply the model converters in one fixed order (torchtitan's `ModelConvertersContainer`
and `parallelize.py` are the model): attention backend, precision policy, FP8 emulation; then the
parallel converters (tensor, context parallel), LoRA and recompute as they land, in that order.

This is the only place that combines model code with those strategies. Each converter receives only its own
sub-config. Data parallelism needs no model change (gradients are averaged in the step).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from mindspore import nn

from ascend_llm.attention.apply import apply_attention
from ascend_llm.config.root import RecipeConfig
from ascend_llm.models import build_model
from ascend_llm.models.lora import apply_lora
from ascend_llm.parallel.ep import ExpertParallelConverter
from ascend_llm.precision import apply_fp8, apply_precision
from ascend_llm.precision.param_dtype import apply_param_dtype
from ascend_llm.train.recompute import apply_recompute


@runtime_checkable
class ModelConverter(Protocol):
    """Converts a model in place before compilation. Optional hooks a converter may define:
    `after_step(step) -> list[dict]` (events), `metrics() -> dict`, and `state_dict()` / `load_state_dict()`
    for state that must survive a resume (checkpointed as the `converters` part, namespaced by `name`)."""

    name: str

    def convert(self, model: nn.Cell) -> None: ...


class ApplyConverter:
    """A stateless converter: `apply_fn(model, cfg)` with its own sub-config (apply_attention, apply_precision,
    apply_fp8, and the parallel converters)."""

    def __init__(self, name: str, apply_fn: Callable[[nn.Cell, Any], Any], cfg: Any):
        self.name, self.apply_fn, self.cfg = name, apply_fn, cfg

    def convert(self, model: nn.Cell) -> None:
        self.apply_fn(model, self.cfg)


class ModelConverters:
    """The converters of a run, applied and consulted in one fixed order."""

    def __init__(self, converters: list[ModelConverter]):
        self.converters = list(converters)

    def convert(self, model: nn.Cell) -> nn.Cell:
        for converter in self.converters:
            converter.convert(model)
        return model

    def get(self, name: str) -> ModelConverter | None:
        """The converter called `name`, or None."""
        return next((c for c in self.converters if c.name == name), None)

    def _with(self, hook: str) -> list[Any]:
        return [c for c in self.converters if callable(getattr(c, hook, None))]

    def after_step(self, step: int) -> list[dict]:
        return [event for c in self._with("after_step") for event in c.after_step(step)]

    def metrics(self) -> dict:
        return {key: value for c in self._with("metrics") for key, value in c.metrics().items()}

    def state_dict(self) -> dict:
        return {f"{c.name}.{key}": value for c in self._with("state_dict") for key, value in c.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for c in self._with("load_state_dict"):
            prefix = f"{c.name}."
            c.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _apply_lora(model: nn.Cell, cfg) -> None:
    if cfg.enabled:
        apply_lora(model, cfg)


class TensorParallelConverter:
    """`parallel.tp.apply_tensor_parallel` over `groups.tp`; records `full_shapes` ({name: shape} of every
    trainable parameter just before sharding) for layout-free checkpoints. `seq_len` is data.seq_len (with
    sequence parallel, seq_len / cp must be divisible by tp: `config.parallel.check_parallel_model`)."""

    name = "tensor_parallel"

    def __init__(self, cfg: Any, groups: Any, seq_len: int):
        self.cfg, self.groups, self.seq_len = cfg, groups, seq_len
        self.full_shapes: dict[str, tuple] = {}

    def convert(self, model: nn.Cell) -> None:
        from ascend_llm.parallel.tp import apply_tensor_parallel

        self.full_shapes = {p.name: tuple(p.shape) for p in model.trainable_params()}
        apply_tensor_parallel(model, self.cfg, self.groups, seq_len=self.seq_len)


class ContextParallelConverter:
    """`parallel.cp.apply_context_parallel` over `groups.cp` at the training length `seq_len`."""

    name = "context_parallel"

    def __init__(self, cfg: Any, groups: Any, seq_len: int):
        self.cfg, self.groups, self.seq_len = cfg, groups, seq_len

    def convert(self, model: nn.Cell) -> None:
        from ascend_llm.parallel.cp import apply_context_parallel

        apply_context_parallel(model, self.cfg, self.groups, self.seq_len)


def build_converters(recipe: RecipeConfig, groups: Any = None) -> ModelConverters:
    """The fixed order: attention, precision, FP8, LoRA (lora.enabled), parameter dtype, then (given this rank's
    `parallel.dims.ParallelGroups`) tensor and context parallel (each the identity at degree 1), recompute."""
    converters: list[ModelConverter] = [ApplyConverter("attention", apply_attention, recipe.attention),
                                        ApplyConverter("precision", apply_precision, recipe.precision),
                                        ApplyConverter("fp8", apply_fp8, recipe.precision),
                                        ApplyConverter("lora", _apply_lora, recipe.lora),
                                        ApplyConverter("param_dtype", apply_param_dtype, recipe.precision.param_dtype)]
    if groups is not None:
        seq_len = recipe.data.seq_len
        converters += [TensorParallelConverter(recipe.parallel, groups, seq_len),
                       ContextParallelConverter(recipe.parallel, groups, seq_len),
                       ExpertParallelConverter(recipe.parallel)]
    converters.append(ApplyConverter("recompute", apply_recompute, recipe.train.recompute))
    return ModelConverters(converters)


def build_training_model(recipe: RecipeConfig) -> nn.Cell:
    """The model of the recipe with every converter applied (seeded init: identical on every rank)."""
    model = build_model(recipe.model, seed=recipe.train.seed)
    return build_converters(recipe).convert(model)
