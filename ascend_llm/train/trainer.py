"""The training loop: data, model, compiled step, validation, metrics, checkpoints, resume, plot, sample.

`train(recipe)` is the API behind `ascend-llm train`; it returns a summary dict with the per-step losses.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import psutil
from mindspore import Tensor, mutable
from omegaconf import OmegaConf

from ascend_llm.cluster.preflight import preflight
from ascend_llm.config.root import RecipeConfig
from ascend_llm.data import PackedDataset, prepare, shard_rows
from ascend_llm.errors import CheckpointError, ConfigError
from ascend_llm.precision import build_controller, build_loss_scaler, describe_precision
from ascend_llm.train.build import build_training_model
from ascend_llm.train.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from ascend_llm.train.metrics import MetricsLog, flops_per_token, plot_loss
from ascend_llm.train.optim import AdamW
from ascend_llm.train.runtime import peak_tflops, setup_runtime
from ascend_llm.train.sample import generate
from ascend_llm.train.schedule import lr_at
from ascend_llm.train.step import build_step_functions


def log(message: str) -> None:
    print(f"[ascend_llm] {message}", file=sys.stderr, flush=True)


def identity(tensors):
    return tensors


def init_parallel(recipe: RecipeConfig) -> tuple[int, int, object]:
    """(rank, world_size, reduce) — communication is initialised only when the recipe asks for > 1 worker."""
    if recipe.parallel.world_size == 1:
        return 0, 1, identity
    from ascend_llm.parallel.dp import build_grad_reducer, init_distributed

    rank, world = init_distributed(recipe.parallel, recipe.cluster)
    return rank, world, build_grad_reducer(None, world)


def _set_parameters(params, arrays: dict, source: str) -> None:
    for p in params:
        if p.name not in arrays:
            raise CheckpointError(source, p.name, "parameter missing from the checkpoint (different model?)")
        value = arrays[p.name]
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointError(f"{source}:{p.name}", tuple(value.shape), f"shape must be {tuple(p.shape)}")
        p.set_data(Tensor(value.astype(np.float32) if value.dtype != np.int32 else value, p.dtype))


def _check_same_model(state: dict, recipe: RecipeConfig, source: str) -> None:
    saved = state.get("config", {}).get("model", {})
    for key, value in asdict(recipe.model).items():
        if key in saved and saved[key] != value:
            raise CheckpointError(f"{source}: model.{key}", saved[key],
                                  f"checkpoint was trained with it; the recipe has {value}")


PRECISION_PREFIX = "precision."


def _restore(recipe: RecipeConfig, run_dir: Path, params, optimizer: AdamW, precision_parts):
    """Returns (start_step, extra state) after loading the checkpoint selected by train.resume."""
    if recipe.train.resume == "none":
        return 0, {}
    if recipe.train.resume == "auto":
        found = latest_valid_checkpoint(run_dir, report=log)
        if found is None:
            log(f"train.resume=auto: no valid checkpoint in {run_dir}; starting from step 0")
            return 0, {}
        path, (model_arrays, optim_arrays, state) = found
    else:
        path = Path(recipe.train.resume)
        model_arrays, optim_arrays, state = load_checkpoint(path)
    _check_same_model(state, recipe, str(path))
    _set_parameters(params, model_arrays, str(path / "model.safetensors"))
    _set_parameters(optimizer.state_parameters(), optim_arrays, str(path / "optimizer.safetensors"))
    precision_state = {k[len(PRECISION_PREFIX):]: v for k, v in optim_arrays.items() if k.startswith(PRECISION_PREFIX)}
    for part in precision_parts:
        part.load_state_dict(precision_state)
    if state.get("global_batch_size") != recipe.train.global_batch_size:
        log(f"resuming with train.global_batch_size={recipe.train.global_batch_size} "
            f"(checkpoint used {state.get('global_batch_size')}): data order continues by position")
    log(f"resumed from {path} at step {state['step']}")
    return int(state["step"]), state


def params_sha256(params) -> str:
    """Digest of all parameter values (sorted by name): equal on every data-parallel rank when in sync."""
    digest = hashlib.sha256()
    for p in sorted(params, key=lambda p: p.name):
        digest.update(p.name.encode())
        digest.update(np.ascontiguousarray(p.asnumpy()).tobytes())
    return digest.hexdigest()


def _validate(dataset: PackedDataset, eval_loss, batch_rows: int, num_batches: int) -> float:
    indices = dataset.val_indices(batch_rows * num_batches)
    losses = []
    for start in range(0, len(indices) - batch_rows + 1, batch_rows):
        x, y = dataset.batch(indices[start:start + batch_rows])
        losses.append(float(eval_loss(Tensor(x), Tensor(y)).asnumpy()))
    return float(np.mean(losses)) if losses else float("nan")


def train(recipe: RecipeConfig) -> dict:
    """Train per the recipe; returns {"losses", "val_losses", "run_dir", "sample", "first_step_s", ...}."""
    preflight(recipe)
    cfg = recipe.train
    device = setup_runtime(recipe.runtime)
    rank, world, reduce = init_parallel(recipe)
    main_rank = rank == 0
    prepared = prepare(recipe.data)
    vocab = prepared.meta["vocab_size"]
    if vocab > recipe.model.vocab_size:
        raise ConfigError("model.vocab_size", recipe.model.vocab_size, f"must be >= the tokenizer's {vocab} ids")
    dataset = PackedDataset(prepared.tokens(), recipe.data.seq_len, recipe.data.val_fraction, recipe.data.seed)
    run_dir = Path(cfg.output_dir)

    model = build_training_model(recipe)
    params = model.trainable_params()
    optimizer = AdamW(params, recipe.optim)
    scaler = build_loss_scaler(recipe.precision)
    controller = build_controller(model, recipe.precision)
    steps = build_step_functions(model, optimizer, recipe.optim.grad_clip, reduce, scaler,
                                 recipe.runtime.mode == "graph")
    start_step, _ = _restore(recipe, run_dir, params, optimizer, (scaler, controller))

    rows_per_rank = cfg.global_batch_size // world
    micro_rows = rows_per_rank // cfg.grad_accum_steps
    grad_scale = Tensor(np.float32(1.0 / cfg.grad_accum_steps))
    tokens_per_step = cfg.global_batch_size * recipe.data.seq_len
    flops_token = flops_per_token(recipe.model, recipe.data.seq_len)
    peak = peak_tflops(recipe.runtime, device) * 1e12 * world
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step) if main_rank else None
    resolved = OmegaConf.to_container(OmegaConf.structured(recipe))
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(recipe)))
        log(f"device={device} mode={recipe.runtime.mode} world_size={world} model={recipe.model.name} "
            f"params={sum(p.size for p in params):,} corpus_tokens={prepared.meta['num_tokens']:,} "
            f"train_windows={dataset.num_train:,} run_dir={run_dir}")
        kinds = Counter(describe_precision(model).values())
        log(f"precision={recipe.precision.name}: " + ", ".join(f"{n} cells {k}" for k, n in sorted(kinds.items())))

    losses, val_losses = [], []
    first_step_s = since_launch_s = None
    window_start, window_tokens = time.perf_counter(), 0
    progress = None
    if main_rank and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.num_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    t_begin = time.perf_counter()
    for step in range(start_step, cfg.num_steps):
        lr = lr_at(step, recipe.optim, cfg.num_steps)
        local = shard_rows(dataset.train_indices(step * cfg.global_batch_size, cfg.global_batch_size), rank, world)
        acc = loss_sum = None
        for micro in range(cfg.grad_accum_steps):
            x, y = dataset.batch(local[micro * micro_rows:(micro + 1) * micro_rows])
            loss, grads = steps.grads(Tensor(x), Tensor(y))
            acc = mutable(grads) if acc is None else mutable(steps.accumulate(acc, mutable(grads)))
            loss_sum = loss if loss_sum is None else loss_sum + loss
        loss, norm, _ = steps.apply(acc, loss_sum, Tensor(np.float32(lr)), grad_scale)
        loss_value, norm_value = float(loss.asnumpy()), float(norm.asnumpy())
        events = [e for e in (scaler.step(step + 1),) if e] + controller.step(step + 1)
        losses.append(loss_value)
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_begin
            since_launch_s = time.time() - psutil.Process().create_time()
            window_start, window_tokens = time.perf_counter(), 0
        else:
            window_tokens += tokens_per_step
        done = step + 1
        record = None
        if done % cfg.log_every == 0 or done == cfg.num_steps or done == start_step + 1:
            record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                      **scaler.metrics(), **controller.metrics()}
            if window_tokens:  # the first step of a process includes compilation: report it as such
                tps = window_tokens / (time.perf_counter() - window_start)
                record.update(tokens_per_s=tps, mfu=flops_token * tps / peak)
            else:
                record.update(compile_and_first_step_s=first_step_s)
            window_start, window_tokens = time.perf_counter(), 0
        if done % cfg.val_every == 0 or done == cfg.num_steps:
            paused = time.perf_counter()
            val = _validate(dataset, steps.eval_loss, micro_rows, cfg.val_batches)
            val_losses.append((done, val))
            record = dict(record or {"step": done, "loss": loss_value}, val_loss=val, val_ppl=float(np.exp(val)))
            window_start += time.perf_counter() - paused  # throughput counts training time only
        if events:
            record = dict(record or {"step": done, "loss": loss_value}, precision_events=events)
        if record and main_rank:
            metrics.write(record)
        if main_rank and (done % cfg.ckpt_every == 0 or done == cfg.num_steps):
            paused = time.perf_counter()
            state = {"position": done * cfg.global_batch_size, "seed": cfg.seed, "data_seed": recipe.data.seed,
                     "global_batch_size": cfg.global_batch_size, "loss": loss_value, "config": resolved,
                     "data": str(prepared.path)}
            save_checkpoint(run_dir, done, {p.name: p.asnumpy() for p in params},
                            {**{p.name: p.asnumpy() for p in optimizer.state_parameters()},
                             **{PRECISION_PREFIX + k: v for part in (scaler, controller)
                                for k, v in part.state_dict().items()}}, state, cfg.keep_last)
            window_start += time.perf_counter() - paused
        if progress is not None:
            progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{(record or {}).get('tokens_per_s', 0):.0f}",
                                 refresh=False)
            progress.update(1)
    if progress is not None:
        progress.close()

    digest = params_sha256(params)
    log(f"rank {rank}: final parameters sha256={digest}")
    summary = {"param_sha256": digest, "losses": losses, "val_losses": val_losses, "run_dir": str(run_dir),
               "first_step_s": first_step_s,
               "launch_to_first_step_s": since_launch_s if losses else None, "start_step": start_step,
               "rank": rank, "world_size": world, "tokens_per_step": tokens_per_step,
               "flops_per_token": flops_token, "peak_flops": peak}
    if main_rank and metrics is not None:
        records = metrics.records()
        if records:
            summary["plot"] = str(plot_loss(records, run_dir / "loss.png", f"{recipe.model.name} on {device}"))
        if cfg.sample_tokens > 0:
            text = generate(model, prepared.tokenizer(), cfg.sample_prompt, cfg.sample_tokens, recipe.data.seq_len,
                            cfg.sample_top_k, cfg.seed, prepared.meta["eos_id"])
            summary["sample"] = text
            (run_dir / "sample.txt").write_text(text)
        (run_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return summary
