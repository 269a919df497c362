"""Tensor parallel (Megatron-LM, Shoeybi et al. 2019, section 3) by a converter; model code untouched.

`apply_tensor_parallel(model, parallel_cfg, groups)` rewrites a built (seeded, full-size) Llama in place for
this rank's coordinate on `groups.tp` (size T, rank t):

- `attention_norm`, `ffn_norm`, `norm` -> `TPNorm`: RMSNorm then Megatron's f (identity forward, all-reduce
  of the gradient backward), so every column-parallel layer after it sees the replicated input and the input
  gradient sums every rank's partial;
- wq, wk, wv, w1, w3 and the output head -> `ColumnParallelLinear`: rows [t*n/T, (t+1)*n/T) of the full
  (n_out, n_in) weight (whole heads for wq/wk/wv: `attention.num_heads`/`num_kv_heads` become H/T, KV/T);
- wo, w2 -> `RowParallelLinear`: columns [t*n/T, (t+1)*n/T), output through g (all-reduce forward,
  identity backward);
- tok_embeddings -> `VocabParallelEmbedding`: rows [t*Vp/T, (t+1)*Vp/T) of the embedding padded to Vp
  (vocab rounded up to a multiple of T, padding rows zero); tokens outside the shard give 0, then g.
  With tied embeddings the model's own `h @ tok_embeddings.weight.T` is then the vocab-parallel head.
- The model's output is this rank's logits (B, S, Vp/T) float32: use `VocabParallelCrossEntropy`.

Weights are sliced from the full seeded initialisation, so a TP run starts from the same model as one
process. Parameter names stay those of the unsharded model. `tp_shard_axes(model)` says which axis of each
parameter is sharded; `gather_full(tensors, ...)` and `shard_full(arrays, ...)` convert between shards and
full (unsharded, unpadded) arrays for layout-free checkpoints.

Supported projections: `nn.Dense` (fp32/fp16/bf16 weights as built); FP8/LoRA cells raise ConfigError.
Sequence parallel is not implemented here (`parallel.sequence_parallel` must stay false with TP).
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.parallel import check_parallel_model
from ascend_llm.errors import ConfigError
from ascend_llm.parallel.comm import AllGather, AllReduce, Group

IGNORE_INDEX = -100


class CopyToTP(nn.Cell):
    """Megatron f: identity forward; backward all-reduce (sum) of the gradient over the TP group."""

    def __init__(self, group: Group):
        super().__init__()
        self.reduce = AllReduce(group, "sum")

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.reduce(dout),)


class ReduceFromTP(nn.Cell):
    """Megatron g: all-reduce (sum) forward over the TP group; identity backward."""

    def __init__(self, group: Group):
        super().__init__()
        self.reduce = AllReduce(group, "sum")

    def construct(self, x):
        return self.reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


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


def _param(full: Parameter, value: np.ndarray, axis) -> Parameter:
    p = Parameter(Tensor(value, full.dtype), name=full.name, requires_grad=full.requires_grad)
    p.tp_axis = axis  # sharded axis (None: replicated); read by tp_shard_axes
    return p


class ColumnParallelLinear(nn.Cell):
    """y = x @ W_t.T (+ b_t): this rank's output rows. x must already be replicated through f (TPNorm)."""

    def __init__(self, dense: nn.Dense, group: Group, rows: int | None = None):
        super().__init__()
        full = dense.weight.asnumpy()
        full = _pad_rows(full, rows or full.shape[0])
        self.weight = _param(dense.weight, _slice(full, 0, group.rank, group.size), 0)
        self.has_bias = dense.has_bias
        if self.has_bias:
            bias = _pad_rows(dense.bias.asnumpy(), rows or full.shape[0])
            self.bias = _param(dense.bias, _slice(bias, 0, group.rank, group.size), 0)

    def construct(self, x):
        y = ops.matmul(x, self.weight.astype(x.dtype).T)
        if self.has_bias:
            y = y + self.bias.astype(y.dtype)
        return y


class RowParallelLinear(nn.Cell):
    """y = g(x_t @ W_t.T) (+ b): x_t is this rank's slice of the input features (a column-parallel output)."""

    def __init__(self, dense: nn.Dense, group: Group):
        super().__init__()
        self.weight = _param(dense.weight, _slice(dense.weight.asnumpy(), 1, group.rank, group.size), 1)
        self.has_bias = dense.has_bias
        if self.has_bias:
            self.bias = _param(dense.bias, dense.bias.asnumpy(), None)
        self.reduce = ReduceFromTP(group)

    def construct(self, x):
        y = self.reduce(ops.matmul(x, self.weight.astype(x.dtype).T))
        if self.has_bias:
            y = y + self.bias.astype(y.dtype)
        return y


class TPNorm(nn.Cell):
    """RMSNorm (same weight Parameter, same fp32 math as models.llama.RMSNorm), then f."""

    def __init__(self, norm: nn.Cell, group: Group):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight
        self.copy = CopyToTP(group)

    def construct(self, x):
        x32 = x.astype(mstype.float32)
        inv = ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + self.eps)
        return self.copy((x32 * inv * self.weight).astype(x.dtype))


class VocabParallelEmbedding(nn.Cell):
    """Rows [start, start + per) of the padded table; tokens elsewhere contribute 0; summed over TP by g.
    tokens (B, S) int32 -> (B, S, dim) in the table's dtype."""

    def __init__(self, embedding: nn.Cell, group: Group, padded: int):
        super().__init__()
        full = _pad_rows(embedding.weight.asnumpy(), padded)
        self.per = padded // group.size
        self.start = group.rank * self.per
        self.weight = _param(embedding.weight, _slice(full, 0, group.rank, group.size), 0)
        self.reduce = ReduceFromTP(group)

    def construct(self, tokens):
        local = tokens - self.start
        inside = ops.logical_and(local >= 0, local < self.per)
        rows = ops.gather(self.weight, ops.where(inside, local, 0), 0)
        rows = rows * inside.expand_dims(-1).astype(rows.dtype)
        return self.reduce(rows)


class VocabParallelCrossEntropy(nn.Cell):
    """Mean token cross-entropy from vocab-sharded logits, never gathering them (Megatron's
    `vocab_parallel_cross_entropy`): with m = max over all shards, Z = sum over shards of sum exp(l - m),
    loss_i = log Z + m - l[target]. The max is a constant (stop_gradient); Z and the target logit are summed
    over TP with g, so each rank's logits get the exact gradient softmax - onehot (divided by the count).

    construct(logits (B, S, Vp/T) float, labels (B, S) int32) -> scalar float32; labels == -100 are ignored;
    padded vocabulary columns (>= vocab_size) are excluded. `count_group` (context parallel) sums the token
    count over the CP group, so each CP rank returns its share of the global mean and the CP ranks' losses
    add up to it. Returns (sum of token losses) / (number of counted tokens).
    """

    def __init__(self, group: Group, vocab_size: int, count_group: Group | None = None):
        super().__init__()
        padded = padded_vocab(vocab_size, group.size)
        self.per = padded // group.size
        self.start = group.rank * self.per
        columns = np.arange(self.start, self.start + self.per)
        self.column_bias = Tensor(np.where(columns < vocab_size, 0.0, -np.inf).astype(np.float32))
        self.max = AllReduce(group, "max")
        self.sum_z = ReduceFromTP(group)
        self.sum_target = ReduceFromTP(group)
        self.count = AllReduce(count_group, "sum") if count_group is not None and count_group.size > 1 else None

    def construct(self, logits, labels):
        logits = logits.astype(mstype.float32).reshape(-1, self.per) + self.column_bias
        labels = labels.reshape(-1)
        top = ops.stop_gradient(self.max(logits.max(-1)))
        shifted = logits - top.expand_dims(-1)
        z = self.sum_z(ops.exp(shifted).sum(-1))
        local = labels - self.start
        inside = ops.logical_and(local >= 0, local < self.per)
        picked = ops.gather_elements(shifted, 1, ops.where(inside, local, 0).expand_dims(-1)).squeeze(-1)
        # the target sum depends on z: the two all-reduces run in the same order on every rank
        target = self.sum_target(ops.depend(ops.where(inside, picked, 0.0), z))
        valid = (labels != IGNORE_INDEX).astype(mstype.float32)
        losses = (ops.log(z) - target) * valid
        count = valid.sum()
        if self.count is not None:
            count = self.count(ops.stop_gradient(count))
        return losses.sum() / ops.maximum(count, 1.0)


def _check_dense(cell: nn.Cell, path: str) -> nn.Dense:
    if type(cell) is not nn.Dense:
        raise ConfigError("parallel.tensor_parallel_degree", path,
                          f"{path} is {type(cell).__name__}; tensor parallel shards nn.Dense projections only "
                          "(apply it before FP8/LoRA converters, or use tensor_parallel_degree=1)")
    return cell


def apply_tensor_parallel(model: nn.Cell, parallel_cfg, groups, seq_len: int | None = None) -> nn.Cell:
    """Shard `model` (a models.llama.Transformer, full size and seeded) over `groups.tp`; see the module doc.
    Identity when the TP group has size 1. ConfigError for indivisible heads/KV heads/FFN or non-Dense
    projections. Returns the model (mutated in place)."""
    group = groups.tp
    if group.size == 1:
        return model
    if parallel_cfg.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", True, "is not implemented with tensor parallel yet; "
                          "set parallel.sequence_parallel=false")
    cfg = model.cfg
    check_parallel_model(parallel_cfg, cfg, seq_len or cfg.max_seq_len)
    tp = group.size
    for i, layer in enumerate(model.layers):
        attn, ffn = layer.attention, layer.feed_forward
        layer.attention_norm = TPNorm(layer.attention_norm, group)
        layer.ffn_norm = TPNorm(layer.ffn_norm, group)
        for name in ("wq", "wk", "wv"):
            setattr(attn, name, ColumnParallelLinear(_check_dense(getattr(attn, name), f"layers.{i}.attention.{name}"),
                                                     group))
        attn.wo = RowParallelLinear(_check_dense(attn.wo, f"layers.{i}.attention.wo"), group)
        attn.num_heads, attn.num_kv_heads = attn.num_heads // tp, attn.num_kv_heads // tp
        for name in ("w1", "w3"):
            setattr(ffn, name, ColumnParallelLinear(_check_dense(getattr(ffn, name), f"layers.{i}.feed_forward.{name}"),
                                                    group))
        ffn.w2 = RowParallelLinear(_check_dense(ffn.w2, f"layers.{i}.feed_forward.w2"), group)
    model.norm = TPNorm(model.norm, group)
    padded = padded_vocab(cfg.vocab_size, tp)
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group, padded)
    if not cfg.tie_embeddings:
        model.output = ColumnParallelLinear(_check_dense(model.output, "output"), group, rows=padded)
    for name, param in model.parameters_and_names():
        if param.name != name:
            param.name = name
    return model


def tp_shard_axes(model: nn.Cell) -> dict[str, int | None]:
    """{parameter name: sharded axis, or None when replicated} for every parameter of the model."""
    return {p.name: getattr(p, "tp_axis", None) for p in model.get_parameters()}


def gather_full(tensors: dict, axes: dict[str, int | None], group: Group, full_shapes: dict[str, tuple]) -> dict:
    """Full (unsharded, unpadded) NumPy arrays from this rank's shards: all-gather along each sharded axis
    over `group`, then drop vocabulary padding rows to `full_shapes[name]`. Eager; every TP rank must call it
    with the same names in the same order. tensors: {name: Tensor or ndarray}."""
    out = {}
    for name, value in tensors.items():
        value = value if isinstance(value, Tensor) else Tensor(np.asarray(value))
        axis = axes.get(name)
        full = value.asnumpy() if axis is None or group.size == 1 else AllGather(group, axis)(value).asnumpy()
        out[name] = full[tuple(slice(0, n) for n in full_shapes[name])]
    return out


def shard_full(arrays: dict[str, np.ndarray], axes: dict[str, int | None], rank: int, size: int) -> dict:
    """This rank's shards of full arrays (the inverse of gather_full): vocabulary rows are zero-padded to a
    multiple of `size` before slicing. arrays: {name: ndarray} with the unsharded model's names and shapes."""
    out = {}
    for name, full in arrays.items():
        axis = axes.get(name)
        if axis is None or size == 1:
            out[name] = full
            continue
        if axis == 0 and full.shape[0] % size:
            full = _pad_rows(full, padded_vocab(full.shape[0], size))
        out[name] = _slice(full, axis, rank, size)
    return out
