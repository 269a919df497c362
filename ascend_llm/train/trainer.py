"""The training loop: a short loop over the parts `train/session.py` assembles.

`train(recipe)` is the API behind `ascend-llm train`; it returns a summary dict with the per-step losses.
Every phase is a function of the session, testable on its own. Anything that may run collectives (the step,
validation, the closing sample, the precision runtime's after-step hook) runs on every rank; only files are
written by the main rank.

SIGINT/SIGTERM during the step loop (`train/stop.py`): the current step finishes, every rank agrees on the stop
after it, that step is checkpointed through the normal path and `TrainingStopped` is raised (the CLI exits 130 or
143); a second signal aborts at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from mindspore import Tensor, mutable

from ascend_llm.config.root import RecipeConfig
from ascend_llm.errors import TrainingDiverged
from ascend_llm.store.files import output_errors, write_file_atomic
from ascend_llm.train.checkpoint import list_checkpoints
from ascend_llm.train.metrics import plot_loss
from ascend_llm.train.sample import generate
from ascend_llm.train.schedule import lr_at
from ascend_llm.train.session import Session, build_session, open_outputs, params_sha256
from ascend_llm.train.state import ParameterState
from ascend_llm.train.stop import StopAgreement, StopSignals, TrainingStopped
from ascend_llm.train.val_sources import source_val_losses

logger = logging.getLogger("ascend_llm.train")


@dataclass
class StepOutcome:
    step: int  # optimizer steps done, counting this one
    loss: float
    grad_norm: float
    lr: float
    finite: bool  # False: the update was skipped (non-finite loss or gradients)
    aux: dict[str, float] = field(default_factory=dict)  # the objective's extra scalars (aux_names)


def train(recipe: RecipeConfig) -> dict:
    """Train per the recipe; returns {"losses", "val_losses", "run_dir", "sample", "first_step_s", ...}.

    Raises ConfigError / DataError / CheckpointError / LaunchError for bad input (before writing anything),
    TrainingDiverged after train.max_nonfinite_steps non-finite steps in a row, and TrainingStopped after a
    SIGINT/SIGTERM stopped the run (its step checkpointed)."""
    session = build_session(recipe)
    open_outputs(session)
    cfg, agreement = recipe.train, StopAgreement(session.world_size)
    with StopSignals() as signals:  # the first SIGINT/SIGTERM is recorded; the step finishes
        for step in range(session.start_step, cfg.num_steps):
            # step: one optimizer update over train.grad_accum_steps micro-batches of this rank's rows
            outcome = run_step(session, step)
            # post-step hooks (all ranks): precision runtime and converters, then the non-finite accounting
            events = session.precision.after_step(outcome.step) + session.converters.after_step(outcome.step)
            check_finite(session, outcome)
            # log: a metrics record every train.log_every steps (and on events), the progress bar every step
            record = step_record(session, outcome, events)
            # validate when due (all ranks: the forward may hold collectives)
            if cfg.val_batches and (outcome.step % cfg.val_every == 0 or outcome.step == cfg.num_steps):
                record = validate(session, outcome, record)
            write_record(session, record, outcome)
            # checkpoint when due (all ranks gather, the main rank writes; never a non-finite state)
            if outcome.step % cfg.ckpt_every == 0 or outcome.step == cfg.num_steps:
                save_checkpoint(session, outcome)
            # stop when any rank received a signal (an all-reduce: every rank, every step)
            signum = agreement.agree(signals.received)
            if signum is not None:
                stop_after(session, outcome, signum, agreement)
    return finish(session)


def run_step(session: Session, step: int) -> StepOutcome:
    """Read this rank's rows of the global batch at the data position, accumulate gradients, update."""
    cfg, steps = session.recipe.train, session.steps
    lr = lr_at(step, session.recipe.optim, cfg.num_steps)
    rows = session.dataset.train_indices(session.data.position, cfg.global_batch_size)
    local, micro = session.layout.local_rows(rows), session.micro_rows
    acc = loss_sum = None
    aux_sum = np.zeros(len(session.objective.aux_names))
    for index in range(cfg.grad_accum_steps):
        batch = read_batch(session, local[index * micro:(index + 1) * micro])
        loss, aux, grads = steps.grads(*batch)
        acc = mutable(grads) if acc is None else mutable(steps.accumulate(acc, mutable(grads)))
        del grads  # not alive during the next micro-batch's backward (one gradient set fewer at the peak)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        aux_sum += [float(a.asnumpy()) for a in aux]
    grad_scale = Tensor(np.float32(1.0 / cfg.grad_accum_steps))
    loss, norm, finite = steps.apply(acc, loss_sum, Tensor(np.float32(lr)), grad_scale)
    # read before the aux all-reduce: that graph call, made while the update still ran, busy-waited in MindSpore
    # 2.10's runtime queue (AsyncRQueue::Wait: 97% of a rank's CPU samples), and on shared cores the spinning ranks
    # starved the others (4 MoE ranks on 2 cores: 25 s -> 12.5 s for a 6-step run with this order)
    loss_value = float(loss.asnumpy())
    aux = reduced_aux(session, aux_sum / cfg.grad_accum_steps)
    session.data.advance(cfg.global_batch_size)
    session.throughput.step_done()
    ok = bool(np.asarray(finite.asnumpy() if hasattr(finite, "asnumpy") else finite)) and math.isfinite(loss_value)
    session.losses.append(loss_value)
    return StepOutcome(step + 1, loss_value, float(norm.asnumpy()), lr, ok, aux)


def reduced_aux(session: Session, means: np.ndarray) -> dict[str, float]:
    """The objective's extra scalars of this step, averaged over data-parallel ranks (every rank calls this)."""
    names = session.objective.aux_names
    if not names:
        return {}
    values = session.steps.reduce_aux(mutable(tuple(Tensor(np.float32(v)) for v in means)))  # one compile
    return {name: float(v.asnumpy()) for name, v in zip(names, values)}


def read_batch(session: Session, rows) -> tuple:
    """The objective's micro-batch as Tensors (language modeling: (x, y) or, with data.document_mask,
    (x, y, segment_ids)), this rank's part of the sequence under context parallel: labels crossing a document
    boundary are -100 (ignored by the loss) and attention stays inside each document."""
    arrays = session.objective.read(session.dataset, rows, session.recipe.data.document_mask)
    return tuple(Tensor(a) for a in session.layout.local_batch(*arrays))


def check_finite(session: Session, outcome: StepOutcome) -> None:
    """Count skipped (non-finite) steps; raise TrainingDiverged after train.max_nonfinite_steps in a row.
    Overflows of a dynamic fp16 loss scale that can still shrink are counted as skipped but are not divergence."""
    run, cfg = session.run, session.recipe.train
    if outcome.finite:
        session.nonfinite_streak = 0
        return
    run.num_skipped_steps += 1
    if math.isfinite(outcome.loss) and session.precision.overflow_is_calibration():
        return  # the fp16 loss scaler halves its scale and logs the overflow itself
    session.nonfinite_streak += 1
    logger.warning("step %d: non-finite loss or gradients (loss=%g, grad_norm=%g): update skipped (%d in a row, "
                   "%d in this run)", outcome.step, outcome.loss, outcome.grad_norm, session.nonfinite_streak,
                   run.num_skipped_steps)
    if session.nonfinite_streak >= cfg.max_nonfinite_steps:
        raise TrainingDiverged(outcome.step, outcome.loss, outcome.grad_norm, session.nonfinite_streak,
                               likely_cause(session.recipe, outcome))


def likely_cause(recipe: RecipeConfig, outcome: StepOutcome) -> str:
    """The recipe field most likely responsible for a run of non-finite steps."""
    if recipe.precision.loss_scale != "none" and math.isfinite(outcome.loss):
        return (f"precision.loss_scale_value={recipe.precision.loss_scale_value:g} (fp16 gradients overflow at "
                "every scale: try precision=bf16)")
    return f"optim.lr={recipe.optim.lr:g} (too high for this model? try 10x lower)"


def step_record(session: Session, outcome: StepOutcome, events: list[dict]) -> dict:
    """The metrics record of this step ({} when nothing is due); updates the progress bar."""
    cfg, record = session.recipe.train, {}
    due = outcome.step % cfg.log_every == 0 or outcome.step == cfg.num_steps or outcome.step == session.start_step + 1
    if due:
        record = {"step": outcome.step, "loss": outcome.loss, **outcome.aux, "lr": outcome.lr,
                  "grad_norm": outcome.grad_norm, "skipped_steps": session.run.num_skipped_steps,
                  **session.precision.metrics(), **session.converters.metrics(), **session.throughput.take()}
        if session.recipe.data.sources:  # the realised mix of a blend, by sequences drawn so far
            record["data_mix"] = session.dataset.describe_mix(session.data.position)
    if events:
        record = dict(record or {"step": outcome.step, "loss": outcome.loss}, precision_events=events)
    if session.progress is not None:
        postfix = {"loss": f"{outcome.loss:.3f}"}
        if session.throughput.last_tokens_per_s:  # known from the first logged window on
            postfix["tok_s"] = f"{session.throughput.last_tokens_per_s:.0f}"
        if session.run.num_skipped_steps:
            postfix["skipped"] = session.run.num_skipped_steps
        session.progress.set_postfix(postfix, refresh=False)
        session.progress.update(1)
    return record


def validate(session: Session, outcome: StepOutcome, record: dict) -> dict:
    """Mean loss over train.val_batches held-out global micro-batches (every rank evaluates its data-parallel
    share of each, and the loss is reduced like the training loss, so the value does not depend on the
    layout); adds val_loss and val_ppl to the record. With no validation windows (data.val_fraction=0) it
    does nothing."""
    rows, num_batches = session.micro_rows * session.layout.dp, session.recipe.train.val_batches
    indices = session.dataset.val_indices(rows * num_batches)
    if len(indices) < rows:
        return record
    with session.throughput.pause():
        values = []  # per held-out micro-batch: (loss, *aux)
        for start in range(0, len(indices) - rows + 1, rows):
            batch = read_batch(session, session.layout.local_rows(indices[start:start + rows]))
            values.append([float(v.asnumpy()) for v in session.steps.eval_loss(*batch)])
    means = np.mean(np.asarray(values, dtype=np.float64), axis=0)
    val = float(means[0])
    session.val_losses.append((outcome.step, val))
    extra = {f"val_{name}": float(v) for name, v in zip(session.objective.aux_names, means[1:])}
    with session.throughput.pause():  # a blend: each source's own held-out loss (forgetting vs gain, val_sources.py)
        extra.update(source_val_losses(session, read_batch, rows, num_batches))
    if session.objective.name == "lm":  # perplexity is exp of a token cross-entropy only
        extra["val_ppl"] = float(np.exp(val))
    return dict(record or {"step": outcome.step, "loss": outcome.loss}, val_loss=val, **extra)


def write_record(session: Session, record: dict, outcome: StepOutcome) -> None:
    if record and session.metrics is not None:
        session.metrics.write(record)


def save_checkpoint(session: Session, outcome: StepOutcome) -> None:
    """Checkpoint this step (every rank gathers sharded state, ZeRO shards and TP shards alike; the main rank
    writes), unless the step was skipped as non-finite (its state is the last finite one, already saved).
    Records the step in session.checkpointed_step."""
    session.checkpointed_step = outcome.step
    if not outcome.finite:
        if session.main_rank:
            logger.warning("step %d: not checkpointing a non-finite step", outcome.step)
        return
    session.run.step, session.run.loss = outcome.step, outcome.loss
    with session.throughput.pause():
        for part in session.checkpoints.parts.values():
            if isinstance(part, ParameterState):
                part.collect()  # TP gather (a collective, every rank)
        session.checkpoints.save(outcome.step)  # ZeRO gathers inside state_dict (every rank); the main rank writes


def stop_after(session: Session, outcome: StepOutcome, signum: int, agreement: StopAgreement) -> None:
    """A signal stops the run after `outcome`'s step (every rank): checkpoint the step unless that is done, wait
    until the main rank has written it (a barrier), close the progress bar, raise TrainingStopped naming the
    newest checkpoint (the one of this step; the last finite one after a non-finite step)."""
    if session.checkpointed_step != outcome.step:
        save_checkpoint(session, outcome)
    agreement.barrier()
    if session.progress is not None:
        session.progress.close()
    if not session.main_rank:  # let the main rank print its line and exit first: msrun kills the others then
        time.sleep(1.0)
    found = list_checkpoints(session.run_dir)
    raise TrainingStopped(signum, outcome.step, found[0] if found else None, session.rank)


def finish(session: Session) -> dict:
    """Close the progress bar, sample (all ranks: the forward may hold collectives), write the plot, the
    sample and summary.json (main rank); returns the summary."""
    if session.progress is not None:
        session.progress.close()
    recipe, cfg = session.recipe, session.recipe.train
    digest = params_sha256(session.model.trainable_params())
    logger.info("rank %d: final parameters sha256=%s (%s)", session.rank, digest, session.layout.coordinates())
    summary = {"param_sha256": digest, "losses": session.losses, "val_losses": session.val_losses,
               "run_dir": str(session.run_dir), "first_step_s": session.throughput.first_step_s,
               "launch_to_first_step_s": session.throughput.launch_to_first_step_s, "start_step": session.start_step,
               "rank": session.rank, "world_size": session.world_size, "skipped_steps": session.run.num_skipped_steps,
               "tokens_per_step": session.throughput.tokens_per_step,
               "flops_per_token": session.throughput.flops_per_token, "peak_flops": session.throughput.peak_flops}
    if cfg.sample_tokens > 0 and session.objective.samples_text:
        forward = session.layout.full_logits(session.model, recipe.model.vocab_size)
        summary["sample"] = generate(forward, session.prepared.tokenizer(), cfg.sample_prompt,
                                     cfg.sample_tokens, recipe.data.seq_len, cfg.sample_top_k, cfg.seed,
                                     session.prepared.meta["eos_id"])
    if session.main_rank:
        _write_outputs(session, summary)
    return summary


def _write_outputs(session: Session, summary: dict) -> None:
    run_dir = session.run_dir
    records = session.metrics.records() if session.metrics is not None else []
    if records:
        summary["plot"] = str(plot_loss(records, run_dir / "loss.png",
                                        f"{session.recipe.model.name} on {session.device}"))
    with output_errors("train.output_dir", run_dir):  # read-only, full, a file: one line, exit 2
        if "sample" in summary:
            write_file_atomic(run_dir / "sample.txt", summary["sample"])
        write_file_atomic(run_dir / "summary.json",
                          json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
