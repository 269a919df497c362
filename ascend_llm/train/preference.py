"""Preference tuning as a training objective: DPO (sigmoid, IPO, hinge) and SimPO (objective.name=dpo | simpo,
settings in config/preference.py, data in data/preference.py).

Per pair, with pi_w / pi_l the policy's summed log-probabilities of the chosen / rejected response tokens, ref_w /
ref_l the reference's, |y| the response lengths in tokens and h = (pi_w - ref_w) - (pi_l - ref_l):
- sigmoid (Rafailov et al. 2023, eq. 7; label smoothing eps as conservative DPO / TRL):
  L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
- ipo (Azar et al. 2023, eq. 17, with the summed log-probabilities of the paper): L = (h - 1 / (2 beta))^2
  (objective.preference.average_logps: every pi and ref divided by its response's token count first, as TRL's
  loss_type=ipo; applies to every DPO loss)
- hinge (SLiC-HF, Zhao et al. 2023, as TRL): L = max(0, 1 - beta h)
- simpo (Meng et al. 2024, eq. 6; no reference): z = beta pi_w / |y_w| - beta pi_l / |y_l| - gamma,
  L = -(1 - eps) log sigma(z) - eps log sigma(-z)
loss = mean over pairs of L + sft_weight * mean over pairs of (-pi_w / |y_w|) (+ a MoE model's aux loss).
Log-probabilities and log-sigmoid are computed in float32 whatever the compute dtype (fp16 log-sigmoid NaNs).
Metrics (TRL's names): rewards/chosen = beta (pi_w - ref_w) (SimPO: beta pi_w / |y_w|), rewards/rejected,
rewards/margins, rewards/accuracies (share of pairs with chosen reward > rejected), logps/chosen, logps/rejected
(summed), sft_loss (the chosen answer's mean token NLL).

The reference: `adapters_off` (LoRA) runs the same weights without adapters in the same compiled step (a view of
the model whose LoRA cells are replaced by their frozen base cells: no second copy of any weight); `cached`
computes reference log-probabilities once with the initial model (before training, the batches shared out over the
data-parallel ranks and the shares summed) and stores them in a file named by a hash of the model's weights and
config, the precision, and the prepared pairs (data files, tokenizer, chat template, seq_len), so any mismatch
finds no file and recomputes.
Layouts: data parallel, ZeRO, tensor parallel and context parallel. Under tensor parallel the logits are
vocab-sharded and each token's log-probability comes from parallel/tp.py `VocabParallelLogProbs` (the log-softmax
gather of the vocab-parallel cross-entropy: exact, never gathering the logits). The reference forward
(adapters_off) runs after the policy's log-probabilities (ops.depend), so both forwards issue their collectives in
one order on every rank. LoRA under tensor parallel is refused by the tensor-parallel converter (LoRA cells are not
sharded). Under context parallel each rank holds a zigzag slice of every row (train/layout.py); its per-row sums
and token counts are all-gathered over the CP group and added, so every CP rank computes the whole pair loss and
returns loss / cp (the trainer sums the shares; the all-gather's backward sums the ranks' 1/cp gradient shares);
the cached reference is computed the same way. The sums and the counts are gathered one after the other (counts
after sums, ops.depend): gathered as one stacked (2, N) tensor, MindSpore 2.10 CPU compiled the first graph of a
run with the segmented attention backend but not the next one holding CP attention ("TupleGetItem, input[0]
should be Sequence, but got Func" at the SegmentedAttention cell built in the trace when the step followed the
cached reference's forward; "input[1] is released" in a Gather, then a segfault, when validation followed the
step), also with an all-reduce instead of the all-gather or the exchange in a cell of its own; naive attention
compiled. Not the cause (tried, same failure): the zigzag-order Gather index Tensor, cp.py's `_part` helper, the
batch shapes, SegmentedAttention cells kept alive or shared between graphs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.preference import resolve_reference
from ascend_llm.errors import ConfigError
from ascend_llm.train.objective import Objective

logger = logging.getLogger(__name__)
AUX_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "sft_loss")


def log_sigmoid(x: Tensor) -> Tensor:
    """log sigma(x) = min(x, 0) - log1p(exp(-|x|)), stable for any float32 x."""
    return ops.minimum(x, 0.0) - ops.log1p(ops.exp(-ops.abs(x)))


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of log p(label) over labelled tokens (N,) float32, number of labelled tokens (N,) float32).
    logits (N, S, V) any float dtype (log-softmax in float32); labels (N, S) int32, -100 = not counted."""
    logp = ops.log_softmax(logits.astype(mstype.float32), -1)
    mask = labels != -100
    safe = ops.where(mask, labels, ops.zeros_like(labels))
    picked = ops.gather_elements(logp, 2, safe.expand_dims(-1)).squeeze(-1)
    maskf = mask.astype(mstype.float32)
    return (picked * maskf).sum(-1), maskf.sum(-1)


def pair_losses(kind: str, beta: float, label_smoothing: float, gamma: float, logp_w: Tensor, logp_l: Tensor,
                ref_w: Tensor, ref_l: Tensor, len_w: Tensor, len_l: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair loss L (B,), reward chosen (B,), reward rejected (B,)), float32, formulas in the module doc.
    kind: sigmoid | ipo | hinge | simpo; ref_* ignored by simpo, len_* used by simpo only."""
    if kind == "simpo":
        reward_w, reward_l = beta * logp_w / len_w, beta * logp_l / len_l
        z = reward_w - reward_l - gamma
        return -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z), reward_w, reward_l
    reward_w, reward_l = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
    h = (logp_w - ref_w) - (logp_l - ref_l)
    if kind == "sigmoid":
        loss = -(1.0 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    elif kind == "hinge":
        loss = ops.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    return loss, reward_w, reward_l


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


SHARED_STATE = ("_params", "_buffers", "training", "mixed_precision_type", "_amp_level")


def adapters_off_view(model: nn.Cell) -> nn.Cell:
    """A cell computing `model` with every LoRA adapter off: containers are fresh cells of the same class whose
    adapter cells (models/lora.py LoraDense, models/moe.py GroupedLora: a frozen `base` plus lora_a/lora_b) are
    replaced by their base cells; every parameter is shared with `model`, none is copied."""

    def is_adapter(cell) -> bool:
        return isinstance(getattr(cell, "base", None), nn.Cell) and hasattr(cell, "lora_a") and hasattr(cell, "lora_b")

    def holds_lora(cell) -> bool:
        return any(is_adapter(c) for _, c in cell.cells_and_names())

    def view(cell):
        if is_adapter(cell):
            return cell.base
        if not holds_lora(cell):
            return cell
        twin = cell.__class__.__new__(cell.__class__)  # the same construct(), Cell's own fresh internals
        nn.Cell.__init__(twin)
        fresh = set(twin.__dict__)
        twin.__dict__.update({k: v for k, v in cell.__dict__.items() if k not in fresh or k in SHARED_STATE})
        for name, child in cell._cells.items():
            twin.insert_child_to_cell(name, view(child))
        return twin

    return view(model)


class PreferenceObjective(Objective):
    """DPO / SimPO (module doc). Batch: tokens, labels (2B, S) int32 (chosen rows, then rejected rows; under context
    parallel this rank's (2B, S/cp) zigzag slice) and the cached reference log-probabilities (2B,) float32 (zeros
    unless reference=cached; whole-row values, not split).

    kind: sigmoid | ipo | hinge | simpo. reference_mode: none (SimPO), cached, adapters_off or live (a frozen
    model given as `reference_model`, e.g. a separate copy). groups: this rank's parallel.dims.ParallelGroups
    (None: one process); vocab_size: the model's vocabulary (needed under tensor parallel)."""

    aux_names = AUX_NAMES
    splits_sequence = True  # tokens and labels are cut along S under context parallel; per-row sums all-gathered

    def __init__(self, kind: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                 sft_weight: float = 0.0, reference_mode: str = "cached", recipe=None,
                 reference_model: Optional[nn.Cell] = None, groups=None, vocab_size: int = 0,
                 average_logps: bool = False):
        self.name = "simpo" if kind == "simpo" else "dpo"
        self.kind, self.beta, self.label_smoothing = kind, float(beta), float(label_smoothing)
        self.gamma, self.sft_weight = float(gamma), float(sft_weight)
        self.reference_mode, self.recipe = reference_mode, recipe
        self.reference = reference_model
        self.dataset, self.prepared, self.main_rank = None, None, True
        self.groups, self.average_logps = groups, bool(average_logps) and kind != "simpo"
        tp = groups.tp.size if groups is not None else 1
        self.cp = groups.cp.size if groups is not None else 1
        self.token_logps = self.gather_cp = None
        if tp > 1:
            from ascend_llm.parallel.tp import VocabParallelLogProbs

            self.token_logps = VocabParallelLogProbs(groups.tp, vocab_size)
        if self.cp > 1:
            from ascend_llm.parallel.comm import AllGather

            self.gather_cp = AllGather(groups.cp, 0)

    def build_data(self, recipe, main_rank: bool):
        from ascend_llm.data.preference import PreferenceDataset, prepare_preference

        prepared = prepare_preference(recipe.data)
        if prepared.meta["vocab_size"] > recipe.model.vocab_size:
            raise ConfigError("model.vocab_size", recipe.model.vocab_size,
                              f"must be >= the tokenizer's {prepared.meta['vocab_size']} ids")
        self.dataset = PreferenceDataset(prepared, recipe.data.val_fraction, recipe.data.seed)
        self.prepared, self.main_rank = prepared, main_rank
        return [prepared], self.dataset

    def read(self, dataset, rows: np.ndarray, with_segments: bool) -> tuple[np.ndarray, ...]:
        tokens, labels = dataset.arrays(rows)
        return tokens, labels, dataset.reference_of(rows)

    def wrap_model(self, model: nn.Cell) -> nn.Cell:
        if self.reference_mode == "adapters_off":
            self.reference = adapters_off_view(model)
        elif self.reference_mode == "cached" and self.dataset is not None:
            self.dataset.reference = cached_reference(model, self.dataset, self.prepared, self.recipe,
                                                      self.main_rank, self)
        return model

    def local_rows(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """This rank's zigzag slice (axis 1) of (N, S) arrays under context parallel (train/layout.py's cut)."""
        if self.cp == 1:
            return arrays
        from ascend_llm.parallel.cp import shard_sequence

        return tuple(np.ascontiguousarray(shard_sequence(a, self.cp, self.groups.cp_rank)) for a in arrays)

    def row_logps(self, out, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(summed log-probabilities (N,), labelled tokens (N,)) float32 of whole rows, from the model's output on
        this rank's part of them: vocab-sharded logits under TP, summed over the CP ranks' slices under CP."""
        logits = _logits(out)
        if self.token_logps is None:
            sums, counts = sequence_logps(logits, labels)
        else:
            maskf = (labels != -100).astype(mstype.float32)
            picked = self.token_logps(logits, labels).reshape(labels.shape)
            sums, counts = (picked * maskf).sum(-1), maskf.sum(-1)
        if self.gather_cp is not None:  # every CP rank's sums, then counts (chained: one order), added (module doc)
            sums = self.gather_cp(sums.expand_dims(0)).sum(0)
            counts = self.gather_cp(ops.stop_gradient(ops.depend(counts, sums)).expand_dims(0)).sum(0)
        return sums, counts

    def loss(self, model: nn.Cell, *batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        tokens, labels, ref = batch[0], batch[1], batch[2]
        out = model(tokens)
        logp, count = self.row_logps(out, labels)
        count = ops.maximum(count, 1.0)
        if self.reference is not None:  # after the policy's collectives (module doc)
            ref = ops.stop_gradient(self.row_logps(self.reference(ops.depend(tokens, logp)), labels)[0])
        b = tokens.shape[0] // 2
        nll_w = -logp[:b] / count[:b]
        if self.average_logps:  # per-token means (TRL's IPO); SimPO divides by the counts itself
            logp, ref = logp / count, ref / count
        losses, reward_w, reward_l = pair_losses(self.kind, self.beta, self.label_smoothing, self.gamma, logp[:b],
                                                 logp[b:], ref[:b], ref[b:], count[:b], count[b:])
        total = losses.mean() + self.sft_weight * nll_w.mean()
        accuracy = (reward_w > reward_l).astype(mstype.float32).mean()
        aux = (reward_w.mean(), reward_l.mean(), (reward_w - reward_l).mean(), accuracy, logp[:b].mean(),
               logp[b:].mean(), nll_w.mean())
        if self.cp > 1:  # every CP rank holds the whole values; the trainer sums the ranks' shares
            total, aux = total / self.cp, tuple(a / self.cp for a in aux)
        if isinstance(out, tuple):
            total = total + out[1]
        return total, aux


def reference_logps(model: nn.Cell, dataset, rows_per_batch: int,
                    objective: Optional[PreferenceObjective] = None) -> np.ndarray:
    """(num pairs, 2) float32 summed log-probabilities of every pair's chosen and rejected response under `model`
    (in pairs.npz order), in batches of rows_per_batch pairs (the last one padded by repeating rows). `objective`
    (None: one process, the whole model) gives the layout: every TP/CP rank of a data-parallel replica computes
    the same batches together (its slice of the rows under CP, sums all-reduced over CP; vocab-parallel
    log-probabilities under TP); with data-parallel degree d > 1 batch b is computed by replica b mod d (every
    rank runs the same number of forwards) and the shares are summed over the data-parallel group."""
    def logps_of(x, y):
        return sequence_logps(_logits(model(x)), y)[0]

    def layout_logps_of(x, y):
        return objective.row_logps(model(x), y)[0]

    forward = ms.jit(logps_of if objective is None else layout_logps_of)
    group = objective.groups.dp if objective is not None and objective.groups is not None else None
    total = dataset.num_train + dataset.num_val
    size, rank = (group.size, group.rank) if group is not None else (1, 0)
    num_batches = -(-total // rows_per_batch)
    out = np.zeros((total, 2), np.float32)
    for batch in range(rank, -(-num_batches // size) * size, size):
        start = (batch % num_batches) * rows_per_batch  # a rank past the last batch recomputes one, unused
        rows = np.arange(start, start + rows_per_batch) % total
        arrays = dataset.arrays(rows)
        if objective is not None:
            arrays = objective.local_rows(*arrays)
        values = forward(*(Tensor(a) for a in arrays)).asnumpy()
        if batch < num_batches:
            take = min(rows_per_batch, total - start)
            out[dataset.pair_ids[start:start + take], 0] = values[:take]
            out[dataset.pair_ids[start:start + take], 1] = values[rows_per_batch:rows_per_batch + take]
    if size > 1:
        from ascend_llm.parallel.comm import all_reduce

        out = all_reduce(Tensor(out), group).asnumpy()
    return out


def reference_key(model: nn.Cell, prepared, recipe, tp_group=None) -> str:
    """sha256 (first 24 hex digits) over the model's parameters (names and values), its config, the precision
    recipe and the prepared pairs' key (data files, tokenizer, chat template, seq_len). Under tensor parallel
    (`tp_group` of size > 1) each rank hashes its shards and the key is the hash of the TP ranks' keys (the same on
    every rank; another key than one process's, so each layout of shards has its own file)."""
    from omegaconf import OmegaConf

    digest = hashlib.sha256()
    for p in sorted(model.get_parameters(), key=lambda p: p.name):
        digest.update(p.name.encode())
        digest.update(np.ascontiguousarray(p.asnumpy()).tobytes())
    config = {"model": OmegaConf.to_container(OmegaConf.structured(recipe.model)),
              "precision": OmegaConf.to_container(OmegaConf.structured(recipe.precision)),
              "data": prepared.meta["key"]}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    key = digest.hexdigest()[:24]
    if tp_group is None or tp_group.size == 1:
        return key
    from ascend_llm.parallel.comm import all_reduce

    slots = np.zeros((tp_group.size, 12), np.float32)  # 12 bytes per rank's key, exact in float32
    slots[tp_group.rank] = np.frombuffer(bytes.fromhex(key), np.uint8)
    keys = all_reduce(Tensor(slots), tp_group).asnumpy().astype(np.uint8)
    return hashlib.sha256(keys.tobytes()).hexdigest()[:24]


def _read_cache(path: Path, total: int) -> Optional[np.ndarray]:
    """The cached (total, 2) values at `path`, or None when there is no file or it does not fit."""
    if not path.is_file():
        return None
    try:
        values = np.load(path)
        if values.shape == (total, 2) and np.all(np.isfinite(values)):
            logger.info("preference: reference log-probabilities from %s", path)
            return values.astype(np.float32)
    except (ValueError, OSError):
        pass
    logger.warning("preference: %s does not fit these pairs; computing the reference again", path)
    return None


def _everyone(ok: bool) -> bool:
    """True when `ok` holds on every rank (an all-reduce over the world: every rank must call it)."""
    from ascend_llm.parallel.comm import all_reduce, world_group

    world = world_group()
    if world.size == 1:
        return ok
    return int(all_reduce(Tensor(np.float32([float(ok)])), world).asnumpy()[0]) == world.size


def cached_reference(model: nn.Cell, dataset, prepared, recipe, main_rank: bool = True,
                     objective: Optional[PreferenceObjective] = None) -> np.ndarray:
    """The reference log-probabilities (num pairs, 2) of the initial model: read from
    <cache_dir>/<reference_key>.npy when every rank finds it there and it fits, else computed by every rank
    (reference_logps with `objective`'s layout) and written by the main process (store.files.write_file_atomic)."""
    from ascend_llm.store.files import write_file_atomic

    cfg = recipe.objective.preference
    folder = Path(cfg.cache_dir or Path(recipe.data.cache_dir) / "reference").expanduser()
    groups = objective.groups if objective is not None else None
    path = folder / f"{reference_key(model, prepared, recipe, groups.tp if groups is not None else None)}.npy"
    total = dataset.num_train + dataset.num_val
    values = _read_cache(path, total)
    if _everyone(values is not None):  # one rank missing the file (another node) makes every rank compute
        return values
    micro = recipe.train.global_batch_size // recipe.train.grad_accum_steps // recipe.parallel.data_parallel_degree
    values = reference_logps(model, dataset, max(micro, 1), objective)
    if main_rank:
        buffer = io.BytesIO()
        np.save(buffer, values)
        write_file_atomic(path, buffer.getvalue(), field="objective.preference.cache_dir")
        logger.info("preference: reference log-probabilities of %d pairs cached in %s", total, path)
    return values


def build_objective(recipe, lm_loss) -> PreferenceObjective:
    """objective.name=dpo | simpo from recipe.objective.preference, on this rank's parallel groups (DP, ZeRO, TP,
    CP). Raises ConfigError for reference=adapters_off without lora.enabled (resolve_reference)."""
    from ascend_llm.parallel.dims import build_groups

    cfg, name = recipe.objective.preference, recipe.objective.name
    mode = resolve_reference(name, cfg, recipe.lora.enabled)  # ConfigError: adapters_off without LoRA
    kind = "simpo" if name == "simpo" else cfg.loss
    return PreferenceObjective(kind, cfg.beta, cfg.label_smoothing, cfg.gamma, cfg.sft_weight, mode, recipe,
                               groups=build_groups(recipe.parallel), vocab_size=recipe.model.vocab_size,
                               average_logps=cfg.average_logps)
