"""Tensor parallel (Megatron-LM, Shoeybi et al. 2019, section 3) by a converter; model code untouched.

`apply_tensor_parallel(model, parallel_cfg, groups)` rewrites a built (seeded, full-size) Llama in place for
this rank's coordinate on `groups.tp` (size T, rank t):

- `attention_norm`, `ffn_norm`, `norm` -> `TPNorm`: RMSNorm then Megatron's f (identity forward, all-reduce
  of the gradient backward), so every column-parallel layer after it sees the replicated input and the input
  gradient sums every rank's partial;
- wq, wk, wv, w1, w3 and the output head: column parallel (`shard_column`, in place, the cell is kept):
  rows [t*n/T, (t+1)*n/T) of the full (n_out, n_in) weight (whole heads for wq/wk/wv:
  `attention.num_heads`/`num_kv_heads` become H/T, KV/T);
- KV-head replication when T is a multiple of KV (GQA with fewer KV heads than ranks; Megatron / vLLM
  convention): rank t keeps the wk/wv rows of KV head t // R, R = T/KV (the one its H/T query heads use), so
  each KV head is replicated on R consecutive TP ranks (`kv_replica_ranks`). The replicas' weight gradients
  differ (their query heads differ) and must be summed: `ReplicatedKV` wraps wk/wv, summing the output
  gradient over the R replicas (so dW = x^T sum(dY), identical on each) and scaling the input gradient by 1/R
  (the R replicas' equal input gradients are then counted once by f's all-reduce over TP). The parameter
  carries `tp_replicas = R`; checkpoints keep the unreplicated names and shapes (one replica is taken);
- wo, w2 -> `RowParallel(cell)`: columns [t*n/T, (t+1)*n/T) sliced in place, output through g (all-reduce
  forward, identity backward);
- tok_embeddings -> `VocabParallelEmbedding`: rows [t*Vp/T, (t+1)*Vp/T) of the embedding padded to Vp
  (vocab rounded up to a multiple of T, padding rows zero); tokens outside the shard give 0, then g.
  With tied embeddings the model's own `h @ tok_embeddings.weight.T` is then the vocab-parallel head.
- The model's output is this rank's logits (B, S, Vp/T) float32: use `VocabParallelCrossEntropy`.

Weights are sliced from the full seeded initialisation, so a TP run starts from the same model as one
process. Parameter names stay those of the unsharded model. `tp_shard_axes(model)` says which axis of each
parameter is sharded, `tp_replicas(model)` which are replicated KV shards; `gather_full(tensors, ...)` and
`shard_full(arrays, ...)` convert between shards and full (unsharded, unpadded, unreplicated) arrays for
layout-free checkpoints. Each sharded parameter also carries `tp_full_shape` (its unsharded shape), so an
optimizer holding only the parameters (parallel/zero.py) can gather layout-free state.

Sequence parallel (`parallel.sequence_parallel`, Korthikanti et al. 2022): the residual stream between the
TP regions is sharded along the sequence (B, S/T, dim); f becomes an all-gather along the sequence (backward
reduce-scatter), g a reduce-scatter (backward all-gather), and the norm weights' gradients are summed over TP
(`GradSumTP`), so the trainer needs no extra reduction. The logits stay (B, S, Vp/T).

Projections are sharded in place, so the converter composes with the precision converters whichever runs
first: nn.Dense, PrecisionDense and Fp8Dense are accepted (anything with a 2-D `weight` and
`in_channels`/`out_channels`). With FP8 delayed scaling each rank's amax is that of its shard (not reduced
over TP), so FP8 numerics under TP differ from one process; the embedding is replaced by
`VocabParallelEmbedding` (float32 gather: a bf16 PrecisionEmbedding's rounding is not kept).
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.parallel import check_parallel_model
from ascend_llm.errors import ConfigError
from ascend_llm.optim.each import square_sum
from ascend_llm.parallel.comm import AllGather, AllReduce, Group, ReduceScatter, gather_arrays

IGNORE_INDEX = -100


class CopyToTP(nn.Cell):
    """Megatron f: identity forward; backward all-reduce (sum) of the gradient over the TP group."""

    def __init__(self, group: Group):
        super().__init__()
        self.reduce = AllReduce(group, "sum")

    def construct(self, x):
        """x unchanged (any shape and dtype)."""
        return x

    def bprop(self, x, out, dout):
        """(dout all-reduced (sum) over the TP group,): same shape and dtype."""
        return (self.reduce(dout),)


class ReduceFromTP(nn.Cell):
    """Megatron g: all-reduce (sum) forward over the TP group; identity backward."""

    def __init__(self, group: Group):
        super().__init__()
        self.reduce = AllReduce(group, "sum")

    def construct(self, x):
        """x all-reduced (sum) over the TP group: same shape and dtype."""
        return self.reduce(x)

    def bprop(self, x, out, dout):
        """(dout,) unchanged."""
        return (dout,)


class GradSumTP(nn.Cell):
    """Identity forward; backward all-reduce (sum) over TP. Applied to a replicated weight used on a shard of
    the sequence (sequence-parallel norms), so every rank gets the full gradient (Megatron's SP all-reduce of
    layer-norm gradients)."""

    def __init__(self, group: Group):
        super().__init__()
        self.reduce = AllReduce(group, "sum")

    def construct(self, w):
        """w unchanged."""
        return w

    def bprop(self, w, out, dout):
        """(dout all-reduced (sum) over the TP group,)."""
        return (self.reduce(dout),)


class ScaleGrad(nn.Cell):
    """Identity forward; backward multiplies the gradient by `scale`. The forward is an Identity op, not `return
    x`: measured on MindSpore 2.10 graph mode, two custom-bprop cells that return their (shared) input unchanged
    (wk's and wv's ScaleGrad on the same x) had their backward applied to each other's gradient as well."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.identity = ops.Identity()

    def construct(self, x):
        """x unchanged (through ops.Identity, see the class doc)."""
        return self.identity(x)

    def bprop(self, x, out, dout):
        """(dout * scale,)."""
        return (dout * self.scale,)


def kv_replicas(num_kv_heads: int, tp: int) -> int:
    """R = TP ranks holding each KV head: tp / num_kv_heads when tp is a larger multiple of it, else 1."""
    return tp // num_kv_heads if tp > num_kv_heads and tp % num_kv_heads == 0 else 1


def kv_replica_ranks(tp_ranks: tuple[int, ...], tp_rank: int, replicas: int) -> tuple[int, ...]:
    """World ranks holding the same KV head as TP rank `tp_rank`: the R consecutive TP ranks of its block."""
    start = (tp_rank // replicas) * replicas
    return tuple(tp_ranks[start:start + replicas])


class ReplicatedKV(nn.Cell):
    """wk or wv whose KV head is replicated on the R ranks of `group` (module doc). Forward: the wrapped
    column-parallel cell's output y (B, S, head_dim) unchanged. Backward: dy summed over `group` before the
    weight gradient (identical gradients on every replica), input gradient scaled by 1/R. Exposes `weight`
    (and `bias`) so parameter names stay `<path>.weight`."""

    def __init__(self, cell: nn.Cell, group: Group):
        super().__init__()
        self.weight = cell.weight
        if cell.has_bias:
            self.bias = cell.bias
        self.inner = cell
        self.scale_input = ScaleGrad(1.0 / group.size)
        self.sum_output = CopyToTP(group)

    def construct(self, x):
        """x (B, S, dim) -> the wrapped cell's output (B, S, head_dim) (one KV head per rank)."""
        return self.sum_output(self.inner(self.scale_input(x)))


def enter_op(group: Group, sequence_parallel: bool) -> nn.Cell:
    """Into the TP region: f, or with SP the all-gather along the sequence (axis 1; backward reduce-scatter)."""
    return AllGather(group, 1) if sequence_parallel else CopyToTP(group)


def exit_op(group: Group, sequence_parallel: bool) -> nn.Cell:
    """Out of the TP region: g, or with SP the reduce-scatter along the sequence (axis 1; backward all-gather)."""
    return ReduceScatter(group, 1) if sequence_parallel else ReduceFromTP(group)


def padded_vocab(vocab_size: int, tp: int) -> int:
    """vocab_size rounded up to a multiple of tp."""
    return -(-vocab_size // tp) * tp


def _slice(full: np.ndarray, axis: int, rank: int, size: int) -> np.ndarray:
    per = full.shape[axis] // size
    return np.ascontiguousarray(np.take(full, np.arange(rank * per, (rank + 1) * per), axis=axis))


def _pad_rows(full: np.ndarray, rows: int) -> np.ndarray:
    if full.shape[0] == rows:
        return full
    pad = np.zeros((rows - full.shape[0],) + full.shape[1:], full.dtype)
    return np.concatenate([full, pad], 0)


def _reshard(param: Parameter, value: np.ndarray, axis) -> None:
    """Replace `param`'s data by this rank's shard (in place: same Parameter object, name and dtype)."""
    param.set_data(Tensor(value, param.dtype), slice_shape=True)
    param.tp_axis = axis  # sharded axis (None: replicated); read by tp_shard_axes


def _linear(cell: nn.Cell, path: str) -> nn.Cell:
    """`cell` if it is a linear cell this converter can shard in place: a 2-D `weight` (out, in) and the
    `in_channels`/`out_channels`/`has_bias` attributes (nn.Dense, precision.PrecisionDense, Fp8Dense)."""
    weight = getattr(cell, "weight", None)
    if not isinstance(weight, Parameter) or len(weight.shape) != 2 or not hasattr(cell, "in_channels"):
        raise ConfigError("parallel.tensor_parallel_degree", path,
                          f"{path} is {type(cell).__name__}; tensor parallel shards linear cells with a (out, in) "
                          "weight (nn.Dense, PrecisionDense, Fp8Dense) only")
    return cell


def shard_column(cell: nn.Cell, group: Group, rows: int | None = None) -> nn.Cell:
    """Column parallel, in place: keep output rows [t*n/T, (t+1)*n/T) of the weight (and bias), after padding
    the rows to `rows` (vocabulary padding). The input must be replicated through f (TPNorm). Returns `cell`."""
    full = _pad_rows(cell.weight.asnumpy(), rows or cell.weight.shape[0])
    _reshard(cell.weight, _slice(full, 0, group.rank, group.size), 0)
    if cell.has_bias:
        bias = _pad_rows(cell.bias.asnumpy(), full.shape[0])
        _reshard(cell.bias, _slice(bias, 0, group.rank, group.size), 0)
    cell.out_channels = full.shape[0] // group.size
    return cell


def shard_replicated_kv(cell: nn.Cell, group: Group, num_kv_heads: int) -> nn.Cell:
    """KV-head replication, in place: keep the rows of KV head t // R (R = T / num_kv_heads) of wk or wv (and
    bias); the weight gets `tp_axis = 0` and `tp_replicas = R`. Returns `cell`."""
    replicas = group.size // num_kv_heads
    head = group.rank // replicas
    _reshard(cell.weight, _slice(cell.weight.asnumpy(), 0, head, num_kv_heads), 0)
    cell.weight.tp_replicas = replicas
    if cell.has_bias:
        _reshard(cell.bias, _slice(cell.bias.asnumpy(), 0, head, num_kv_heads), 0)
        cell.bias.tp_replicas = replicas
    cell.out_channels = cell.weight.shape[0]
    return cell


class RowParallel(nn.Cell):
    """Row parallel: the wrapped linear cell keeps input columns [t*n/T, (t+1)*n/T) of its weight (sliced in
    place), and its output goes through g (with sequence parallel: reduce-scatter along the sequence, so y is
    (B, S/T, n_out)). The wrapper exposes the same `weight` Parameter so the name stays `<path>.weight`."""

    def __init__(self, cell: nn.Cell, group: Group, sequence_parallel: bool = False, path: str = "row"):
        super().__init__()
        if cell.has_bias:
            raise ConfigError("parallel.tensor_parallel_degree", path,
                              f"{path} has a bias; row-parallel layers must not (it would be added T times)")
        _reshard(cell.weight, _slice(cell.weight.asnumpy(), 1, group.rank, group.size), 1)
        cell.in_channels = cell.weight.shape[1]
        self.weight = cell.weight
        self.inner = cell
        self.reduce = exit_op(group, sequence_parallel)

    def construct(self, x):
        """x (B, S, n_in/T) -> (B, S, n_out) summed over TP; with sequence parallel (B, S/T, n_out)."""
        return self.reduce(self.inner(x))


class TPNorm(nn.Cell):
    """The model's RMSNorm (same weight Parameter, same fp32 kernel as models.llama.RMSNorm), then f. With
    sequence parallel: x is this rank's sequence shard (B, S/T, dim), the weight's gradient is summed over TP,
    and the output is all-gathered along the sequence (B, S, dim)."""

    def __init__(self, norm: nn.Cell, group: Group, sequence_parallel: bool = False):
        super().__init__()
        self.weight, self.kernel = norm.weight, norm.kernel
        self.enter = enter_op(group, sequence_parallel)
        self.sequence_parallel = sequence_parallel
        if sequence_parallel:
            self.grad_sum = GradSumTP(group)

    def construct(self, x):
        """x (B, S, dim), with sequence parallel (B, S/T, dim) -> normalised (B, S, dim) in x's dtype, replicated
        on every TP rank."""
        weight = self.grad_sum(self.weight) if self.sequence_parallel else self.weight
        return self.enter(self.kernel(x, weight))


class HeadNormTP(nn.Cell):
    """A per-head RMSNorm (`model.qk_norm`, weight (head_dim,), Qwen3) on this rank's heads (B, S, H/T, D): the
    weight is replicated, each rank's heads give part of its gradient, so the gradient is summed over TP."""

    def __init__(self, norm: nn.Cell, group: Group):
        super().__init__()
        self.weight, self.kernel = norm.weight, norm.kernel
        self.grad_sum = GradSumTP(group)

    def construct(self, x):
        """x (B, S, H/T, head_dim) or (B, S, KV/T, head_dim) -> same shape, normalised over head_dim."""
        return self.kernel(x, self.grad_sum(self.weight))


class VocabParallelEmbedding(nn.Cell):
    """Rows [start, start + per) of the padded table; tokens elsewhere contribute 0; summed over TP by g.
    tokens (B, S) int32 -> (B, S, dim) in the table's dtype; with sequence parallel g is a reduce-scatter
    along the sequence and the result is (B, S/T, dim)."""

    def __init__(self, embedding: nn.Cell, group: Group, padded: int, sequence_parallel: bool = False):
        super().__init__()
        full = _pad_rows(embedding.weight.asnumpy(), padded)
        self.per = padded // group.size
        self.start = group.rank * self.per
        _reshard(embedding.weight, _slice(full, 0, group.rank, group.size), 0)
        self.weight = embedding.weight
        self.reduce = exit_op(group, sequence_parallel)

    def construct(self, tokens):
        """tokens (B, S) int32 -> (B, S, dim) in the table's dtype (with sequence parallel (B, S/T, dim))."""
        local = tokens - self.start
        inside = ops.logical_and(local >= 0, local < self.per)
        rows = ops.gather(self.weight, ops.where(inside, local, 0), 0)
        rows = rows * inside.expand_dims(-1).astype(rows.dtype)
        return self.reduce(rows)


class VocabParallelLogProbs(nn.Cell):
    """log softmax(logits)[label] per token from vocab-sharded logits, never gathering them (the log-softmax gather
    of Megatron's `vocab_parallel_cross_entropy`): with m = max over all shards, Z = sum over shards of
    sum exp(l - m), log p = (l[label] - m) - log Z. The max is a constant (stop_gradient); Z and the label's logit
    are summed over TP with g, so each rank's logits get the exact gradient of log p (onehot - softmax, on its
    columns). Used by the token cross-entropy below and by preference tuning's per-sequence sums.

    construct(logits (..., Vp/T) float, labels (...) int32) -> (prod(labels.shape),) float32, flattened; a label
    outside [0, vocab_size) (e.g. -100) gives -log Z (mask it); padded vocabulary columns (>= vocab_size) are
    excluded from Z."""

    def __init__(self, group: Group, vocab_size: int):
        super().__init__()
        padded = padded_vocab(vocab_size, group.size)
        self.per = padded // group.size
        self.start = group.rank * self.per
        columns = np.arange(self.start, self.start + self.per)
        self.column_bias = Tensor(np.where(columns < vocab_size, 0.0, -np.inf).astype(np.float32))
        self.max = AllReduce(group, "max")
        self.sum_z = ReduceFromTP(group)
        self.sum_target = ReduceFromTP(group)

    def construct(self, logits, labels):
        """logits (..., Vp/T) float, labels (...) int32 -> (N,) float32 log-probabilities (see the class doc)."""
        logits = logits.astype(mstype.float32).reshape(-1, self.per) + self.column_bias
        labels = labels.reshape(-1)
        top = ops.stop_gradient(self.max(logits.max(axis=-1)))
        shifted = logits - top.expand_dims(-1)
        z = self.sum_z(ops.exp(shifted).sum(-1))
        local = labels - self.start
        inside = ops.logical_and(local >= 0, local < self.per)
        picked = ops.gather_elements(shifted, 1, ops.where(inside, local, 0).expand_dims(-1)).squeeze(-1)
        # the target sum depends on z: the two all-reduces run in the same order on every rank
        target = self.sum_target(ops.depend(ops.where(inside, picked, 0.0), z))
        return target - ops.log(z)


class VocabParallelCrossEntropy(nn.Cell):
    """Mean token cross-entropy from vocab-sharded logits, never gathering them (Megatron's
    `vocab_parallel_cross_entropy`): loss_i = -log p_i from `VocabParallelLogProbs` (log Z + m - l[target]),
    whose max is a constant and whose Z and target logit are summed over TP with g, so each rank's logits get the
    exact gradient softmax - onehot (divided by the count).

    construct(logits (B, S, Vp/T) float, labels (B, S) int32) -> scalar float32; labels == -100 are ignored;
    padded vocabulary columns (>= vocab_size) are excluded. `count_group` (the trainer's data x context
    parallel group) sums the token count over those ranks, so each returns its share of the global token mean;
    `count_scale` (the data-parallel degree) undoes the trainer's 1/dp averaging of the shares, so the reduced
    loss is sum(all token losses) / (all counted tokens) even when ranks count different numbers of tokens
    (document masking). Returns count_scale * (sum of this rank's token losses) / (counted tokens over the group).
    """

    def __init__(self, group: Group, vocab_size: int, count_group: Group | None = None, count_scale: float = 1.0):
        super().__init__()
        self.log_probs = VocabParallelLogProbs(group, vocab_size)
        self.count = AllReduce(count_group, "sum") if count_group is not None and count_group.size > 1 else None
        self.count_scale = float(count_scale)

    def construct(self, logits, labels):
        """logits (B, S, Vp/T) float, labels (B, S) int32 (-100 ignored) -> float32 scalar (see the class doc)."""
        valid = (labels.reshape(-1) != IGNORE_INDEX).astype(mstype.float32)
        losses = -self.log_probs(logits, labels) * valid
        count = valid.sum()
        if self.count is not None:
            count = self.count(ops.stop_gradient(count))
        return losses.sum() * self.count_scale / ops.maximum(count, 1.0)


def apply_tensor_parallel(model: nn.Cell, parallel_cfg, groups, seq_len: int | None = None) -> nn.Cell:
    """Shard `model` (a models.llama.Transformer, full size and seeded) over `groups.tp`; see the module doc.
    `seq_len` (the per-rank sequence length before SP, i.e. after CP) is checked for SP divisibility.
    Identity when the TP group has size 1. ConfigError for indivisible heads/KV heads/FFN or non-Dense
    projections. Returns the model (mutated in place)."""
    group = groups.tp
    if group.size == 1:
        return model
    sp = bool(parallel_cfg.sequence_parallel)
    cfg = model.cfg
    check_parallel_model(parallel_cfg, cfg, seq_len or cfg.max_seq_len)
    tp = group.size
    full_shapes = {id(p): tuple(p.shape) for p in model.get_parameters()}
    replicas = kv_replicas(cfg.num_kv_heads, tp)
    kv_group = _kv_group(group, replicas) if replicas > 1 else None
    for i, layer in enumerate(model.layers):
        attn, ffn = layer.attention, layer.feed_forward
        prefix = f"layers.{i}"
        layer.attention_norm = TPNorm(layer.attention_norm, group, sp)
        layer.ffn_norm = TPNorm(layer.ffn_norm, group, sp)
        shard_column(_linear(attn.wq, f"{prefix}.attention.wq"), group)
        for name in ("wk", "wv"):
            cell = _linear(getattr(attn, name), f"{prefix}.attention.{name}")
            if kv_group is None:
                shard_column(cell, group)
            else:
                setattr(attn, name, ReplicatedKV(shard_replicated_kv(cell, group, cfg.num_kv_heads), kv_group))
        if getattr(attn, "qk_norm", False):
            attn.q_norm, attn.k_norm = HeadNormTP(attn.q_norm, group), HeadNormTP(attn.k_norm, group)
        attn.wo = RowParallel(_linear(attn.wo, f"{prefix}.attention.wo"), group, sp, f"{prefix}.attention.wo")
        attn.num_heads, attn.num_kv_heads = attn.num_heads // tp, max(attn.num_kv_heads // tp, 1)
        for name in ("w1", "w3"):
            shard_column(_linear(getattr(ffn, name), f"{prefix}.feed_forward.{name}"), group)
        ffn.w2 = RowParallel(_linear(ffn.w2, f"{prefix}.feed_forward.w2"), group, sp, f"{prefix}.feed_forward.w2")
    model.norm = TPNorm(model.norm, group, sp)
    padded = padded_vocab(cfg.vocab_size, tp)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group, padded, sp)
    if not cfg.tie_embeddings:
        shard_column(_linear(model.output, "output"), group, rows=padded)
    for name, param in model.parameters_and_names():
        if param.name != name:
            param.name = name
        if getattr(param, "tp_axis", None) is not None:
            param.tp_full_shape = full_shapes[id(param)]
    return model


def _kv_group(group: Group, replicas: int) -> Group:
    """The group of TP ranks sharing this rank's KV head: the TP group itself when every rank shares one head
    (num_kv_heads = 1), else a new group (every TP rank creates its own block's group, in the same order)."""
    ranks = kv_replica_ranks(group.ranks, group.rank, replicas)
    if ranks == group.ranks:
        return group
    from ascend_llm.parallel.comm import new_group

    return new_group("tp_kv_" + "_".join(map(str, ranks)), ranks)


def tp_shard_axes(model: nn.Cell) -> dict[str, int | None]:
    """{parameter name: sharded axis, or None when replicated} for every parameter of the model."""
    return {p.name: getattr(p, "tp_axis", None) for p in model.get_parameters()}


def tp_replicas(model: nn.Cell) -> dict[str, int]:
    """{parameter name: R} for the KV-replicated shards (R TP ranks hold each); other parameters are absent."""
    return {p.name: p.tp_replicas for p in model.get_parameters() if getattr(p, "tp_replicas", 1) > 1}


def _one_replica(gathered: np.ndarray, axis: int, replicas: int, size: int) -> np.ndarray:
    """From the TP all-gather of a KV-replicated shard (size blocks along `axis`, R consecutive equal ones per
    KV head), the first block of each head: the unreplicated array."""
    per = gathered.shape[axis] // size
    keep = np.concatenate([np.arange(b * per, (b + 1) * per) for b in range(0, size, replicas)])
    return np.take(gathered, keep, axis=axis)


def gather_full(tensors: dict, axes: dict[str, int | None], group: Group, full_shapes: dict[str, tuple],
                replicas: dict[str, int] | None = None) -> dict:
    """Full (unsharded, unpadded, unreplicated) NumPy arrays from this rank's shards: all-gather along each
    sharded axis over `group`, keep one block per KV head for the names in `replicas` ({name: R}), then drop
    vocabulary padding rows to `full_shapes[name]`. Eager, all shards in a few calls (`comm.gather_arrays`);
    every TP rank must call it with the same names in the same order. tensors: {name: Tensor or ndarray}."""
    replicas = replicas or {}
    local = {name: value.asnumpy() if isinstance(value, Tensor) else np.asarray(value)
             for name, value in tensors.items()}
    sharded = [name for name in local if axes.get(name) is not None and group.size > 1]
    gathered = dict(zip(sharded, gather_arrays([local[n] for n in sharded], group, [axes[n] for n in sharded])))
    out = {}
    for name, value in local.items():
        full = gathered.get(name, value)
        if name in gathered and replicas.get(name, 1) > 1:
            full = _one_replica(full, axes[name], replicas[name], group.size)
        out[name] = full[tuple(slice(0, n) for n in full_shapes[name])]
    return out


def shard_full(arrays: dict[str, np.ndarray], axes: dict[str, int | None], rank: int, size: int,
               replicas: dict[str, int] | None = None) -> dict:
    """This rank's shards of full arrays (the inverse of gather_full): vocabulary rows are zero-padded to a
    multiple of `size` before slicing; a name in `replicas` ({name: R}) gets KV head rank // R of size / R.
    arrays: {name: ndarray} with the unsharded model's names and shapes."""
    replicas = replicas or {}
    out = {}
    for name, full in arrays.items():
        axis = axes.get(name)
        if axis is None or size == 1:
            out[name] = full
            continue
        r = replicas.get(name, 1)
        if r > 1:
            out[name] = _slice(full, axis, rank // r, size // r)
            continue
        if axis == 0 and full.shape[0] % size:
            full = _pad_rows(full, padded_vocab(full.shape[0], size))
        out[name] = _slice(full, axis, rank, size)
    return out


def sharded_norm_weights(params) -> tuple[float, ...]:
    """Per parameter, the weight of its local |g|^2 in the TP-summed part of the global norm: 1 for a TP shard,
    1/R for a KV shard replicated on R ranks (the R equal copies then count once), 0 for a parameter replicated
    on every TP rank (counted once, outside the TP sum)."""
    return tuple(0.0 if getattr(p, "tp_axis", None) is None else 1.0 / getattr(p, "tp_replicas", 1)
                 for p in params)


def replicated_norm_weights(sharded_weights: tuple[float, ...]) -> tuple[float, ...]:
    """The complement of `sharded_norm_weights`: 1 for a parameter replicated on every TP rank (its |g|^2
    counted once, outside the TP sum), 0 for a shard."""
    return tuple(1.0 if w == 0.0 else 0.0 for w in sharded_weights)


class TPGradNorm(nn.Cell):
    """Global L2 norm of gradients sharded over TP (the norm clipping must use with TP: train/step.py passes it
    to `optim.adamw.clip_to_norm`):
    sqrt(sum over replicated params of |g|^2 + all-reduce over TP of the sum over sharded params of
    w * |g|^2), w from `sharded_norm_weights` (1/R for replicated KV shards). Replicated gradients are equal on
    every TP rank, so they are counted once. Vocabulary padding rows have zero gradient and add nothing.
    construct(grads: tuple, same order as `params`) -> float32 scalar."""

    def __init__(self, params, group: Group):
        super().__init__()
        self.weights = sharded_norm_weights(params)
        self.replicated = replicated_norm_weights(self.weights)
        self.reduce = AllReduce(group, "sum")

    def construct(self, grads):
        """grads: tuple in the order of `params` -> float32 scalar, the global L2 norm."""
        replicated, sharded = square_sum(grads, self.replicated), square_sum(grads, self.weights)
        return ops.sqrt(replicated + self.reduce(sharded))
