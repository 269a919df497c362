"""Assembling a training run: every part the loop needs, built once, in one place.

`build_session(recipe)` runs the preflight, sets the device, initialises communication, prepares the data,
builds the model with its converters, the optimizer, the precision runtime and the compiled step functions,
and then restores the checkpoint `train.resume` selects. Nothing is written to `train.output_dir` before
every check has passed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ascend_llm.cluster.preflight import preflight
from ascend_llm.config.preference import step_work
from ascend_llm.config.root import RecipeConfig
from ascend_llm.data import build_dataset, prepare_sources
from ascend_llm.errors import ConfigError
from ascend_llm.optim.adamw import AdamW
from ascend_llm.parallel.dims import build_groups
from ascend_llm.parallel.dp import init_distributed
from ascend_llm.parallel.plan_time import flops_per_token
from ascend_llm.precision import describe_precision
from ascend_llm.precision.runtime import PrecisionRuntime, build_precision_runtime
from ascend_llm.store.files import output_errors, write_file_atomic
from ascend_llm.train.build import ModelConverters, build_converters
from ascend_llm.train.checkpoint import CheckpointManager, guard_fresh_run, sha256_file
from ascend_llm.train.layout import TrainLayout
from ascend_llm.train.metrics import MetricsLog, Throughput
from ascend_llm.train.objective import LanguageModeling, Objective, build_objective
from ascend_llm.train.runtime import peak_tflops, setup_runtime
from ascend_llm.train.state import DataState, OptimizerState, ParameterState, RunState
from ascend_llm.train.step import StepFunctions, build_step_functions, cross_entropy_loss, masked_cross_entropy_loss

logger = logging.getLogger("ascend_llm.train")


@dataclass
class Session:
    """The parts of one training run (one process, one rank)."""

    recipe: RecipeConfig
    rank: int
    world_size: int
    device: str
    prepared: Any
    dataset: Any  # PackedDataset or BlendedDataset (same interface)
    model: Any
    converters: ModelConverters
    optimizer: AdamW
    precision: PrecisionRuntime
    steps: StepFunctions
    data: DataState
    run: RunState
    checkpoints: CheckpointManager
    throughput: Throughput
    layout: TrainLayout
    start_step: int = 0
    metrics: MetricsLog | None = None
    progress: Any = None
    nonfinite_streak: int = 0
    checkpointed_step: int | None = None  # the last step save_checkpoint was called for
    objective: Objective = field(default_factory=lambda: LanguageModeling(cross_entropy_loss))
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.recipe.train.output_dir)

    @property
    def micro_rows(self) -> int:
        """Sequences per micro-batch on this rank (its data-parallel replica's share)."""
        cfg = self.recipe.train
        return cfg.global_batch_size // self.layout.dp // cfg.grad_accum_steps


def checkpoint_text_files(recipe, tokenizer_file: Path) -> dict[str, Path]:
    """Files every checkpoint copies: the run's tokenizer.json and, for a fine-tune of a model directory
    (model.pretrained), that directory's other text files (tokenizer config, chat template, generation config with
    its EOS list), so the checkpoint says what its base said about text even if the base moves."""
    from ascend_llm.tokenizer.hf import TEXT_FILES

    files = {"tokenizer.json": tokenizer_file}
    if recipe.model.pretrained:
        root = Path(recipe.model.pretrained)
        files.update({name: root / name for name in TEXT_FILES if name != "tokenizer.json" and (root / name).is_file()})
    return files


def data_identity(recipe: RecipeConfig, prepared_all: list) -> dict:
    """What a checkpoint's data position means: tokenizer hash, seq_len, data seed, corpus (every source and
    its weight, for a blend)."""
    prepared, meta = prepared_all[0], prepared_all[0].meta
    corpus = "; ".join(f"{p.meta.get('source')} ({p.meta.get('num_tokens')} tokens)" for p in prepared_all)
    if recipe.data.sources:
        corpus = f"{list(recipe.data.sources)}: {corpus}"
    return {"tokenizer_sha256": sha256_file(prepared.path / "tokenizer.json"),
            "tokenizer": recipe.data.tokenizer or "trained", "seq_len": recipe.data.seq_len,
            "data_seed": recipe.data.seed, "corpus": corpus, "document_mask": recipe.data.document_mask,
            "vocab_size": meta["vocab_size"],
            "global_batch_size": recipe.train.global_batch_size}


def _build_data(recipe: RecipeConfig, main_rank: bool, objective: Objective):
    """Every source prepared (cached; atomic, so ranks racing on a first preparation keep one result) and the
    dataset over them (PackedDataset, or BlendedDataset for data.sources), unless the objective reads its own."""
    own = objective.build_data(recipe, main_rank)
    if own is not None:
        return own
    prepared_all = prepare_sources(recipe.data, progress=main_rank and recipe.train.progress)
    vocab = prepared_all[0].meta["vocab_size"]
    if vocab > recipe.model.vocab_size:
        raise ConfigError("model.vocab_size", recipe.model.vocab_size, f"must be >= the tokenizer's {vocab} ids")
    return prepared_all, build_dataset(recipe.data, prepared_all)


def check_param_dtype(recipe: RecipeConfig, device: str) -> None:
    """bf16 parameters need fp32 master weights (the ZeRO optimizer keeps them, also under tensor/context
    parallel: the same sharding code as float32, see parallel/zero.py) and bf16 kernels (Ascend only)."""
    dtype, par = recipe.precision.param_dtype, recipe.parallel
    if dtype == "float32":
        return
    if device != "Ascend":
        raise ConfigError("precision.param_dtype", dtype, "runs on Ascend only (the CPU backend has no bf16 "
                          "Assign/StridedSlice kernels); use float32 on CPU")
    if par.zero_stage == 0:
        raise ConfigError("precision.param_dtype", dtype, "needs the fp32 master weights of parallel.zero_stage "
                          ">= 1; use float32 otherwise")


def build_optimizer(params, recipe: RecipeConfig, groups=None):
    """AdamW, or with parallel.zero_stage 1/2 the ZeRO-sharded AdamW. Pure data parallel: over the world.
    With tensor/context parallel (`groups`: this rank's parallel.dims.ParallelGroups, required then): over
    groups.dp_cp (the ranks holding this TP rank's identical shards), gradients scaled 1/dp like the trainer's
    reducer, the clipping norm and the layout-free state also reduced/gathered over groups.tp. Stage 2 clips
    inside the optimizer (no rank holds full gradients)."""
    stage, par = recipe.parallel.zero_stage, recipe.parallel
    if stage == 0:
        return AdamW(params, recipe.optim)
    from ascend_llm.parallel.zero import ZeroAdamW

    clip = recipe.optim.grad_clip if stage == 2 else 0.0
    if int(getattr(par, "expert_parallel_degree", 1)) > 1:  # expert shards over expert-data-parallel (parallel/ep.py)
        from ascend_llm.parallel.ep import build_ep_groups

        ep_group, edp_group = build_ep_groups(par)
        return ZeroAdamW(params, recipe.optim, stage, group=groups.dp_cp, grad_clip=clip,
                         grad_scale=1.0 / par.data_parallel_degree, expert_groups=(edp_group, ep_group))
    if par.tensor_parallel_degree == 1 and par.context_parallel_degree == 1:
        return ZeroAdamW(params, recipe.optim, stage, grad_clip=clip)
    if groups is None:
        raise ValueError("build_optimizer: tensor/context parallel ZeRO needs this rank's ParallelGroups")
    return ZeroAdamW(params, recipe.optim, stage, group=groups.dp_cp, grad_clip=clip, tp_group=groups.tp,
                     grad_scale=1.0 / par.data_parallel_degree)


def build_session(recipe: RecipeConfig) -> Session:
    """All parts of a run, restored from `train.resume`. Raises ConfigError, DataError, CheckpointError,
    LaunchError (one line each, exit 2 in the CLI) before writing anything to train.output_dir."""
    preflight(recipe)
    cfg = recipe.train
    device = setup_runtime(recipe.runtime)
    check_param_dtype(recipe, device)
    rank, world = init_distributed(recipe.parallel, recipe.cluster)  # before data: see parallel/dp.py
    layout = TrainLayout(recipe.parallel, build_groups(recipe.parallel))  # every rank, before the model
    plain_loss = masked_cross_entropy_loss if recipe.data.document_mask else cross_entropy_loss
    objective = build_objective(recipe, layout.loss_fn(recipe.model.vocab_size, plain_loss,
                                                       masked=recipe.data.document_mask))
    if layout.cp > 1 and not objective.splits_sequence:
        raise ConfigError("parallel.context_parallel_degree", recipe.parallel.context_parallel_degree,
                          f"must be 1 with objective.name={objective.name} (its batches are not token sequences)")
    prepared_all, dataset = _build_data(recipe, rank == 0, objective)
    prepared = prepared_all[0]  # the tokenizer, vocabulary and EOS id are shared by every source
    if cfg.resume == "none" and (rank == 0 or not cfg.overwrite):  # with overwrite, rank 0 alone clears
        guard_fresh_run(Path(cfg.output_dir), cfg.overwrite)
    converters = build_converters(recipe, layout.groups)
    from ascend_llm.models import build_model

    model = build_model(recipe.model, seed=cfg.seed)
    if recipe.model.pretrained:  # every rank reads the weights, before any converter
        from ascend_llm.interop.pretrained import load_pretrained_weights

        load_pretrained_weights(model, recipe.model)
    model = objective.wrap_model(converters.convert(model))
    params = model.trainable_params()
    optimizer = build_optimizer(params, recipe, layout.groups)
    precision = build_precision_runtime(model, recipe.precision)
    steps = build_step_functions(model, optimizer, recipe.optim.grad_clip, layout.grad_reducer(world, params),
                                 precision.scaler, recipe.runtime.mode == "graph", grad_norm=layout.grad_norm(params),
                                 objective=objective)
    sharding = layout.sharding(model, converters.get("tensor_parallel").full_shapes)
    data = DataState(data_identity(recipe, prepared_all))
    run = RunState(OmegaConf.to_container(OmegaConf.structured(recipe)), seed=cfg.seed)
    parts = {"model": ParameterState(params, "model", sharding), "optimizer": OptimizerState(optimizer, sharding),
             "precision": precision, "converters": converters, "data": data, "run": run}
    checkpoints = CheckpointManager(Path(cfg.output_dir), parts, cfg.keep_last, writer=rank == 0,
                                    files=checkpoint_text_files(recipe, prepared.path / "tokenizer.json"))
    start_step = checkpoints.restore(cfg.resume, cfg.allow_data_change)
    rows, reference = step_work(recipe)  # a preference pair is 2 sequences; DPO's adapters-off reference a forward
    tokens_per_step = cfg.global_batch_size * recipe.data.seq_len * rows
    throughput = Throughput(tokens_per_step, flops_per_token(recipe.model, recipe.data.seq_len,
                                                             reference_forward=reference),
                            peak_tflops(recipe.runtime, device) * 1e12 * world)
    return Session(recipe, rank, world, device, prepared, dataset, model, converters, optimizer, precision, steps,
                   data, run, checkpoints, throughput, layout, start_step=start_step, objective=objective)


def open_outputs(session: Session) -> None:
    """Main rank: the run directory, config.yaml, metrics.jsonl (trimmed to the resumed step), the progress
    bar, and the opening log lines."""
    if not session.main_rank:
        return
    recipe, run_dir = session.recipe, session.run_dir
    with output_errors("train.output_dir", run_dir):  # read-only, full, a file: one line, exit 2
        write_file_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(session.run.config)))
        session.metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=session.start_step)
    num_params = sum(p.size for p in session.model.trainable_params())
    logger.info("device=%s mode=%s world_size=%d model=%s params=%s corpus_tokens=%s train_windows=%s run_dir=%s",
                session.device, recipe.runtime.mode, session.world_size, recipe.model.name, f"{num_params:,}",
                f"{session.prepared.meta['num_tokens']:,}", f"{session.dataset.num_train:,}", run_dir)
    logger.info("data split: %s", json.dumps(session.dataset.describe_split()))
    kinds = Counter(describe_precision(session.model).values())
    cells = ", ".join(f"{n} cells {k}" for k, n in sorted(kinds.items()))
    logger.info("precision=%s: %s", recipe.precision.name, cells)
    if recipe.train.progress:
        from tqdm import tqdm

        session.progress = tqdm(total=recipe.train.num_steps, initial=session.start_step, desc="train",
                                unit="step", dynamic_ncols=True)


def params_sha256(params) -> str:
    """Digest of all parameter values (sorted by name): equal on every data-parallel rank when in sync."""
    import numpy as np

    digest = hashlib.sha256()
    for p in sorted(params, key=lambda p: p.name):
        digest.update(p.name.encode())
        digest.update(np.ascontiguousarray(p.asnumpy()).tobytes())
    return digest.hexdigest()
