"""Mixture-of-Experts feed-forward (Qwen2-MoE, Qwen3-MoE) as pure MindSpore cells.

A sparse layer's `feed_forward` is a `MoEFeedForward`: a router (`router.weight` (E, H), no bias) gives
softmax probabilities over the E experts in float32, each token takes its top-k experts (probabilities
renormalised to sum 1 when `norm_topk_prob`), and its output is the probability-weighted sum of those experts'
SwiGLU outputs; Qwen2-MoE adds sigmoid(shared_expert_gate(x)) * shared_expert(x). This is transformers'
`Qwen2MoeSparseMoeBlock` / `Qwen3MoeSparseMoeBlock` (5.x). Stable names: `router`, `experts.{w1,w3,w2}` (stacked
weights (E, I, H), (E, I, H), (E, H, I); w1 = gate_proj, w3 = up_proj, w2 = down_proj as in the dense layers),
`shared_expert.{w1,w2,w3}`, `shared_expert_gate`.

Experts are computed without a Python loop over experts (dropless, static shapes, plain MindSpore ops that run
on CPU and Ascend and differentiate exactly):
- tiled path: every (token, expert) pair gets a row of a buffer in which each expert's rows are contiguous and
  padded to a multiple of `tile` rows (its rank among the expert's pairs is a cumsum of one-hot rows, so no sort
  is needed); each tile of `tile` rows then belongs to one expert, and the experts run as one batched matmul of
  the tiles against their experts' gathered weights (MegaBlocks' block-sparse grouping, Gale et al. 2022). The
  static buffer has (E + 1) * tile rows beyond the N * k real ones, tile chosen so that this is about half of them;
- all-experts path, for few tokens (decode): every expert on every token as one batched matmul, combined with
  zero weight for the experts a token did not choose; taken when E * N rows are fewer than the tiled buffer's.

The load-balancing loss is transformers' `load_balancing_loss_func` (Switch Transformer, Fedus et al. 2021,
eq. 4): over the tokens of all sparse layers together, f_e = (top-k slots that chose e) / (tokens * layers),
P_e = mean router probability of e, aux = E * sum_e f_e P_e; the trainer adds router_aux_loss_coef * aux. The
optional router z-loss (ST-MoE, Zoph et al. 2022, eq. 5) is the mean over tokens and sparse layers of
logsumexp(router logits)^2, times router_z_loss_coef.
"""

from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.model import ModelConfig


class Router(nn.Cell):
    """Router logits in float32: x (N, H) -> (N, E) = x @ weight^T with `weight` (E, H) (HF `mlp.gate`). A plain
    parameter, not a Dense, so precision policies and quantization leave it in float32."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((num_experts, dim), np.float32)), name="weight")

    def construct(self, x):
        """x (N, H) any float dtype -> router logits (N, E) float32."""
        return ops.matmul(x.astype(mstype.float32), self.weight.astype(mstype.float32).T)


class GroupedLinear(nn.Cell):
    """E stacked linear maps without bias: `weight` (E, out, in), (out, in) per expert like nn.Dense."""

    stacked_2d = False  # see expert_weight_of

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((num_experts, out_features, in_features), np.float32)),
                                name="weight")

    def expert_weight(self):
        """The stacked weight (E, out, in) the experts compute with."""
        return self.weight


class GroupedLora(nn.Cell):
    """LoRA on stacked experts (models/lora.py applies it to GroupedLinear targets): per expert
    W_e + (alpha / r) B_e A_e with A (E, r, in) ~ Normal(0, 1/r) and B (E, out, r) = 0; the base is frozen."""

    stacked_2d = False

    def __init__(self, base: GroupedLinear, rank: int, alpha: float, dropout: float, rng: np.random.Generator):
        super().__init__()
        num, out_features, in_features = base.weight.shape
        if dropout > 0:
            from ascend_llm.errors import ConfigError

            raise ConfigError("lora.dropout", dropout, "must be 0 with expert targets (the adapter is folded into "
                              "the expert weights)")
        self.base = base
        base.weight.requires_grad = False
        self.lora_a = Parameter(Tensor(rng.normal(0.0, 1.0 / rank, (num, rank, in_features)).astype(np.float32)),
                                name="lora_a")
        self.lora_b = Parameter(Tensor(np.zeros((num, out_features, rank), np.float32)), name="lora_b")
        self.scaling = alpha / rank

    def expert_weight(self):
        """(E, out, in): the frozen weight plus scaling * B_e A_e (float32 adapter, cast to the weight's dtype)."""
        delta = ops.bmm(self.lora_b, self.lora_a) * self.scaling
        return self.base.weight + delta.astype(self.base.weight.dtype)


def expert_weight_of(cell, num_experts: int):
    """(E, out, in) weight of an experts' linear cell: `expert_weight()` of a GroupedLinear / GroupedLora, or, for
    a cell marked `stacked_2d = True` that holds the experts as one (E * out, in) matrix (a quantized layer,
    quant/apply.py), its `dequantized_weight()` reshaped."""
    if cell.stacked_2d:
        weight = cell.dequantized_weight()
        return weight.reshape(num_experts, weight.shape[0] // num_experts, weight.shape[1])
    return cell.expert_weight()


def route(logits, top_k: int, norm_topk_prob: bool):
    """logits (N, E) float32 -> (probs (N, E), weights (N, k), indices (N, k) int32): softmax in float32, top-k in
    decreasing probability (torch.topk's order), weights renormalised to sum 1 when norm_topk_prob."""
    probs = ops.softmax(logits, -1)
    weights, indices = ops.topk(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return probs, weights, indices.astype(mstype.int32)


def choose_tile(num_pairs: int, num_experts: int) -> int:
    """Rows per tile of the tiled path: the largest power of two in [8, 1024] with E * tile <= num_pairs / 2
    where possible (at most about half the real rows of padding). Few large tiles beat many small ones: each
    tile gathers 3 I H expert weights and is one matmul of the batch (measured with `bench moe`'s shapes on CPU,
    feed-forward fwd+bwd vs dense: 2.0x at tile 128, 2.5x at 64, 2.8x at 32, 4.9x at 16)."""
    target = max(num_pairs // (2 * num_experts), 1)
    return int(min(1024, max(8, 2 ** int(math.floor(math.log2(target))))))


def use_tiled(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether the tiled path computes fewer rows than running every expert on every token."""
    pairs = num_tokens * top_k
    tile = choose_tile(pairs, num_experts)
    return (pairs // tile + 1 + num_experts) * tile < num_experts * num_tokens


_bmm_nt = ops.BatchMatMul(transpose_b=True)  # (T, b, in) x (T, out, in) -> (T, b, out), no transposed copy


def _swiglu_tiles(xb, w13, w2):
    """xb (T, b, H), w13 (T, 2I, H) = [w1; w3] per tile, w2 (T, H, I) -> (T, b, H): w2 (silu(w1 x) * w3 x).
    One matmul for the gate and up projections (w1 and w3 stacked): fewer, larger batched matmuls."""
    gate, up = ops.split(_bmm_nt(xb, w13), w13.shape[1] // 2, 2)
    return _bmm_nt(ops.silu(gate) * up, w2)


def tiled_experts(x, weights, indices, w1, w3, w2):
    """Dropless grouped SwiGLU (see the module docstring). x (N, H); weights (N, k) float; indices (N, k) int32;
    w1/w3 (E, I, H), w2 (E, H, I) -> (N, H) in x's dtype: sum_j weights[n, j] * expert_{indices[n, j]}(x[n])."""
    num_tokens, top_k = indices.shape
    num_experts, dim = w1.shape[0], x.shape[1]
    pairs = num_tokens * top_k
    tile = choose_tile(pairs, num_experts)
    num_tiles = pairs // tile + 1 + num_experts  # >= ceil((pairs + E * (tile - 1)) / tile)
    rows = num_tiles * tile
    flat = indices.reshape(pairs)
    onehot = ops.one_hot(flat, num_experts, Tensor(1, mstype.int32), Tensor(0, mstype.int32))
    rank = (ops.cumsum(onehot, 0) * onehot).sum(1) - 1  # order of each pair among its expert's pairs
    counts = onehot.sum(0)
    padded = (counts + tile - 1) // tile * tile
    ends = ops.cumsum(padded, 0)
    dest = ops.gather(ends - padded, flat, 0) + rank  # buffer row of each pair, (P,)
    token = ops.arange(pairs, dtype=mstype.int32) // top_k
    src = ops.scatter_nd(dest.reshape(pairs, 1), token + 1, (rows,)) - 1  # token of each row, -1 for padding
    src = ops.where(src < 0, ops.full_like(src, num_tokens), src)
    starts = ops.arange(num_tiles, dtype=mstype.int32) * tile
    tile_expert = (starts.reshape(-1, 1) >= ends.reshape(1, -1)).astype(mstype.int32).sum(1)
    tile_expert = ops.minimum(tile_expert, num_experts - 1)
    x_ext = ops.concat((x, ops.zeros((1, dim), x.dtype)), 0)
    xb = ops.gather(x_ext, src, 0).reshape(num_tiles, tile, dim)
    w13 = ops.concat((w1, w3), 1)  # (E, 2I, H)
    yb = _swiglu_tiles(xb, ops.gather(w13, tile_expert, 0), ops.gather(w2, tile_expert, 0)).reshape(rows, dim)
    y = ops.gather(yb, dest, 0) * weights.reshape(pairs, 1).astype(x.dtype)
    return y.reshape(num_tokens, top_k, dim).sum(1)


def all_experts(x, weights, indices, w1, w3, w2):
    """Same result as tiled_experts, every expert run on every token: (E, N, ...) batched matmuls, combined with
    the routing weights scattered into (N, E) (zero for experts a token did not choose)."""
    num_experts = w1.shape[0]
    xe = ops.broadcast_to(x.reshape(1, x.shape[0], x.shape[1]), (num_experts, x.shape[0], x.shape[1]))
    ye = _swiglu_tiles(xe, ops.concat((w1, w3), 1), w2)  # (E, N, H)
    onehot = ops.one_hot(indices, num_experts, Tensor(1.0, mstype.float32), Tensor(0.0, mstype.float32))
    combine = (onehot * weights.astype(mstype.float32).reshape(indices.shape + (1,))).sum(1)  # (N, E)
    return (ye * combine.T.reshape(num_experts, -1, 1).astype(x.dtype)).sum(0)


def grouped_swiglu(x, weights, indices, w1, w3, w2):
    """Dispatch to the path with fewer rows for these static shapes (see use_tiled)."""
    if use_tiled(indices.shape[0], indices.shape[1], w1.shape[0]):
        return tiled_experts(x, weights, indices, w1, w3, w2)
    return all_experts(x, weights, indices, w1, w3, w2)


class GroupedExperts(nn.Cell):
    """E SwiGLU experts with stacked weights: w1, w3 (E, I, H) and w2 (E, H, I) (GroupedLinear cells)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.compute_dtype = None  # GEMM dtype set by the precision policy (precision/policy.py); None: x's dtype
        self.w1 = GroupedLinear(num_experts, dim, hidden_dim)
        self.w2 = GroupedLinear(num_experts, hidden_dim, dim)
        self.w3 = GroupedLinear(num_experts, dim, hidden_dim)

    def construct(self, x, weights, indices):
        """x (N, H), weights (N, k), indices (N, k) int32 in [0, E) -> (N, H) in x's dtype (computed in
        compute_dtype when the precision policy set one)."""
        dtype = x.dtype if self.compute_dtype is None else self.compute_dtype
        w1 = expert_weight_of(self.w1, self.num_experts).astype(dtype)
        w3 = expert_weight_of(self.w3, self.num_experts).astype(dtype)
        w2 = expert_weight_of(self.w2, self.num_experts).astype(dtype)
        return grouped_swiglu(x.astype(dtype), weights, indices, w1, w3, w2).astype(x.dtype)


class MoEFeedForward(nn.Cell):
    """The sparse layer's feed-forward: routed experts (+ Qwen2-MoE's gated shared expert); see the module docstring."""

    def __init__(self, cfg: ModelConfig, dense: type):
        """dense: the dense SwiGLU cell class (models/llama.py FeedForward), for Qwen2-MoE's shared expert."""
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, \
            cfg.norm_topk_prob
        self.router = Router(cfg.dim, cfg.num_experts)
        self.experts = GroupedExperts(cfg.num_experts, cfg.dim, cfg.moe_ffn_hidden_dim)
        self.has_shared = cfg.shared_expert_ffn_hidden_dim > 0
        if self.has_shared:
            self.shared_expert = dense(cfg.dim, cfg.shared_expert_ffn_hidden_dim)
            self.shared_expert_gate = nn.Dense(cfg.dim, 1, has_bias=False)

    def routed(self, x):
        """x (B, S, H) -> (y (B, S, H) in x's dtype, logits (B*S, E) float32, indices (B*S, k) int32)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        _, weights, indices = route(logits, self.top_k, self.norm_topk_prob)
        y = self.experts(flat, weights, indices)
        if self.has_shared:
            gate = ops.sigmoid(self.shared_expert_gate(flat).astype(mstype.float32)).astype(y.dtype)
            y = y + gate * self.shared_expert(flat)
        return y.reshape(shape), logits, indices

    def construct(self, x):
        """x (B, S, H) -> (B, S, H) in x's dtype."""
        return self.routed(x)[0]

    def router_stats(self, logits, indices):
        """(3, E) float32: slot counts per expert, probability sums per expert, and the sum over tokens of
        logsumexp(logits)^2 spread evenly over the E entries (row sum = that sum)."""
        probs = ops.softmax(logits, -1)
        counts = ops.one_hot(indices, self.num_experts, Tensor(1.0, mstype.float32),
                             Tensor(0.0, mstype.float32)).sum((0, 1))
        z = ops.logsumexp(logits, -1)
        z_sum = ops.broadcast_to((z * z).sum().reshape(1), (self.num_experts,)) / self.num_experts  # sums to it
        return ops.stack((counts, probs.sum(0), z_sum))


def build_feed_forward(cfg: ModelConfig, index: int, dense: type) -> nn.Cell:
    """Layer `index`'s feed-forward: MoEFeedForward when cfg.is_sparse_layer(index), else dense(dim, ffn_hidden_dim)
    (dense: models/llama.py FeedForward, passed in so that this module does not import llama.py)."""
    if cfg.is_sparse_layer(index):
        return MoEFeedForward(cfg, dense)
    return dense(cfg.dim, cfg.ffn_hidden_dim)


def moe_aux_loss(stats, num_tokens: int, num_experts: int, aux_coef: float, z_coef: float):
    """stats (3, E) summed over the sparse layers (MoEFeedForward.router_stats), num_tokens = tokens x sparse
    layers -> aux_coef * E * sum_e f_e P_e + z_coef * mean logsumexp^2, a float32 scalar (module docstring)."""
    f = stats[0] / num_tokens
    p = stats[1] / num_tokens
    loss = aux_coef * num_experts * (f * p).sum()
    if z_coef > 0:
        loss = loss + z_coef * stats[2].sum() / num_tokens
    return loss


def layers_with_aux(layers, h, cos, sin, segment_ids):
    """Run the decoder layers, collecting router statistics of the sparse ones: -> (h, stats (3, E) summed, number
    of sparse layers). Layers are TransformerBlocks; a sparse one's feed_forward is a MoEFeedForward."""
    stats = None
    sparse = 0
    for layer in layers:
        if layer.is_sparse:
            a = h + layer.attention(layer.attention_norm(h), cos, sin, segment_ids)
            y, logits, indices = layer.feed_forward.routed(layer.ffn_norm(a))
            h = a + y
            s = layer.feed_forward.router_stats(logits, indices)
            stats = s if stats is None else stats + s
            sparse += 1
        else:
            h = layer(h, cos, sin, segment_ids)
    return h, stats, sparse


def moe_param_count(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters of one sparse layer's feed-forward, of them active per token): router E*H, experts
    3*E*H*I (active k of them), shared expert 3*H*I_s + gate H."""
    router = cfg.num_experts * cfg.dim
    expert = 3 * cfg.dim * cfg.moe_ffn_hidden_dim
    shared = 0
    if cfg.shared_expert_ffn_hidden_dim:
        shared = 3 * cfg.dim * cfg.shared_expert_ffn_hidden_dim + cfg.dim
    return router + cfg.num_experts * expert + shared, router + cfg.num_experts_per_tok * expert + shared
