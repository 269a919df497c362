"""Llama-family decoder as pure MindSpore cells: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Stable sub-cell names (tok_embeddings, layers.N.attention.{wq,wk,wv,wo}, layers.N.feed_forward.{w1,w2,w3},
attention_norm, ffn_norm, norm, output) let precision maps, shard plans and checkpoints key on them.
This module imports nothing from precision/ or parallel/: those are applied by converters.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.attention.core import CoreAttention
from ascend_llm.config.model import ModelConfig
from ascend_llm.models.moe import build_feed_forward, layers_with_aux, moe_aux_loss, moe_param_count


class RMSNormKernel(nn.Cell):
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight in fp32, returned in x's dtype, with a hand-written backward.

    construct(x (..., D) float, weight (D,) float32) -> (..., D) in x.dtype. The backward recomputes
    xhat = x * r (r = rsqrt(mean(x^2) + eps)) and applies the closed form (Zhang & Sennrich 2019, RMSNorm)
        dweight = sum_rows(dy * xhat),   dx = r * (dy * w - xhat * mean(dy * w * xhat, -1)),
    in a third of the graph ops (and buffers) that autodiff of the forward produces.
    """

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def _normalize(self, x32):
        return x32 * ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + self.eps)

    def construct(self, x, weight):
        """x (..., D) float, weight (D,) float32 -> (..., D) in x.dtype (normalised in fp32)."""
        return (self._normalize(x.astype(mstype.float32)) * weight).astype(x.dtype)

    def bprop(self, x, weight, out, dout):
        """The closed-form gradients of the class docstring: dx (..., D) in x.dtype and dweight (D,) in weight.dtype."""
        x32 = x.astype(mstype.float32)
        inv = ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + self.eps)
        xhat = x32 * inv
        dy = dout.astype(mstype.float32)
        dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        g = dy * weight
        dx = inv * (g - xhat * (g * xhat).mean(-1, keep_dims=True))
        return dx.astype(x.dtype), dw.astype(weight.dtype)


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in the input dtype (see RMSNormKernel)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones(dim, np.float32)), name="weight")
        self.kernel = RMSNormKernel(eps)

    def construct(self, x):
        """x (..., dim) -> (..., dim), same dtype as x."""
        return self.kernel(x, self.weight)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies (head_dim / 2,) float64: theta^(-2i/d), with Llama 3.1 scaling when configured.

    `llama3` scaling (Meta's llama-models `apply_scaling`, transformers `_compute_llama3_parameters`): with
    wavelength w = 2*pi/f, low = L/low_freq_factor, high = L/high_freq_factor (L = original context):
    w > low -> f/factor; w < high -> f; otherwise (1 - s) f/factor + s f with s = (L/w - low_ff)/(high_ff - low_ff).
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if cfg.rope_scaling_type != "llama3":
        return inv_freq
    factor, low_ff, high_ff = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = float(cfg.rope_original_max_seq_len)
    wavelen = 2.0 * np.pi / inv_freq
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    scaled = np.where(wavelen > old_len / low_ff, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_len / high_ff) & (wavelen <= old_len / low_ff)
    return np.where(medium, (1.0 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                inv_freq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (max_seq_len, head_dim) in the rotate-half (HF/Qwen) layout, float32.

    inv_freq (head_dim / 2,) overrides theta^(-2i/d) (see rope_inv_freq for scaled variants)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(max_seq_len, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class RopeKernel(nn.Cell):
    """y = x * cos + swap(x) * sin_signed in fp32, returned in x's dtype, with a hand-written backward.

    swap(x) = concat(x[..., d/2:], x[..., :d/2]) and sin_signed = concat(-sin[:, :d/2], sin[:, d/2:]), which is
    the rotate-half form x * cos + concat(-x2, x1) * sin without a Neg over the activations. swap is its own
    transpose, so dx = dy * cos + swap(dy * sin_signed): no slice gradients or zero-padded buffers.
    """

    def construct(self, x, cos, sin_signed):
        """x (B, H, S, D); cos and sin_signed (S, D) or (B, 1, S, D) float32 -> (B, H, S, D) in x.dtype."""
        x32 = x.astype(mstype.float32)
        return (x32 * cos + swap_halves(x32) * sin_signed).astype(x.dtype)

    def bprop(self, x, cos, sin_signed, out, dout):
        """dx = dy * cos + swap(dy * sin_signed) in x.dtype; zero gradients for the tables."""
        dy = dout.astype(mstype.float32)
        dx = dy * cos + swap_halves(dy * sin_signed)
        return dx.astype(x.dtype), ops.zeros_like(cos), ops.zeros_like(sin_signed)


def swap_halves(x):
    """concat(x[..., D/2:], x[..., :D/2]) along the last axis (D even); same shape and dtype."""
    half = x.shape[-1] // 2
    return ops.concat((x[..., half:], x[..., :half]), -1)


_rope_kernel = RopeKernel()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + d/2]) by position angles; x is BNSD, cos/sin are (S, D) from
    `rope_tables`. fp32 math, result in x's dtype."""
    half = sin.shape[-1] // 2
    sin_signed = ops.concat((-sin[..., :half], sin[..., half:]), -1)  # (S, D) in training, (B, 1, S, D) in the engine
    return _rope_kernel(x, cos, sin_signed)


class Attention(nn.Cell):
    """Grouped-query self-attention; `core_attention` (AttentionConfig defaults) is replaced by `apply_attention`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Dense(cfg.dim, cfg.num_heads * cfg.head_dim, has_bias=cfg.qkv_bias)
        self.wk = nn.Dense(cfg.dim, cfg.num_kv_heads * cfg.head_dim, has_bias=cfg.qkv_bias)
        self.wv = nn.Dense(cfg.dim, cfg.num_kv_heads * cfg.head_dim, has_bias=cfg.qkv_bias)
        self.wo = nn.Dense(cfg.num_heads * cfg.head_dim, cfg.dim, has_bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.core_attention = CoreAttention()

    def project_qkv(self, x, cos, sin):
        """x (B, S, dim) -> q (B, H, S, D), k and v (B, H_kv, S, D); q/k normed per head (qk_norm) then rotated.
        cos/sin broadcast against (B, H, S, D): (S, D) or per-row (B, 1, S, D)."""
        batch, seq, _ = x.shape
        q = self.wq(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.wk(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.wv(x).reshape(batch, seq, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(0, 2, 1, 3), cos, sin)
        k = apply_rope(k.transpose(0, 2, 1, 3), cos, sin)
        return q, k, v

    def project_qkv_bsnd(self, x, cos, sin):
        """x (B, S, dim) -> q (B, S, H, D), k and v (B, S, H_kv, D), without transposes; cos/sin (S, D)."""
        batch, seq, _ = x.shape
        q = self.wq(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.wk(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.wv(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.expand_dims(-2), sin.expand_dims(-2)  # (S, 1, D): broadcast over the heads
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def construct(self, x, cos, sin, segment_ids=None):
        """x (B, S, dim), cos/sin (S, head_dim) or (B, 1, S, head_dim), segment_ids (B, S) int32 or None
        -> (B, S, dim): causal (block-diagonal per document with segment_ids) attention, then `wo`. A core that
        takes (B, S, N, D) (`layout` "BSND": the fused kernel) gets q/k/v and returns its output without
        transposes, so wo keeps the kernel's own output: one saved copy of it, not two (issue 23)."""
        batch, seq, _ = x.shape
        if getattr(self.core_attention, "layout", "BNSD") == "BSND":
            out = self.core_attention(*self.project_qkv_bsnd(x, cos, sin), segment_ids)
        else:
            out = self.core_attention(*self.project_qkv(x, cos, sin), segment_ids).transpose(0, 2, 1, 3)
        return self.wo(out.reshape(batch, seq, self.num_heads * self.head_dim))


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Dense(dim, hidden_dim, has_bias=False)
        self.w2 = nn.Dense(hidden_dim, dim, has_bias=False)
        self.w3 = nn.Dense(dim, hidden_dim, has_bias=False)

    def construct(self, x):
        """x (..., dim) -> (..., dim): w2(silu(w1 x) * w3 x)."""
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Cell):
    """Pre-norm decoder layer: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)).
    Layer `index` of a MoE config may be sparse (feed_forward a models/moe.py MoEFeedForward)."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_sparse = cfg.is_sparse_layer(index)
        self.feed_forward = build_feed_forward(cfg, index, FeedForward)

    def construct(self, x, cos, sin, segment_ids=None):
        """x (B, S, dim), cos/sin RoPE tables, segment_ids (B, S) int32 or None -> (B, S, dim), x's dtype."""
        h = x + self.attention(self.attention_norm(x), cos, sin, segment_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class Embedding(nn.Cell):
    """Token embedding with a plain `weight` parameter (vocab_size, dim)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = Parameter(Tensor(np.zeros((vocab_size, dim), np.float32)), name="weight")

    def construct(self, tokens):
        """tokens (...) int32 -> (..., dim) rows of `weight`, in its dtype (float32 unless precision.param_dtype)."""
        return ops.gather(self.weight, tokens, 0)


class Transformer(nn.Cell):
    """Decoder-only Llama: tokens (batch, seq) int32 -> logits (batch, seq, vocab) float32.

    With experts (cfg.num_experts > 0) `return_aux_loss` is True and the model returns (logits, aux_loss): the
    router losses already scaled by their coefficients (models/moe.py moe_aux_loss; 0 without sparse layers);
    set it False for plain logits (the model opener does, for inference)."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.CellList([TransformerBlock(cfg, i) for i in range(cfg.num_layers)])
        self.num_sparse = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))
        self.return_aux_loss = cfg.num_experts > 0
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.tie_embeddings = cfg.tie_embeddings
        if not cfg.tie_embeddings:
            self.output = nn.Dense(cfg.dim, cfg.vocab_size, has_bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, rope_inv_freq(cfg))
        self.rope_cos = Tensor(cos)
        self.rope_sin = Tensor(sin)
        init_weights(self, cfg, seed)

    def construct(self, tokens, segment_ids=None):
        """tokens (B, S) int32; segment_ids (B, S) int32 document ids of packed sequences, or None.
        Returns logits (B, S, vocab) float32."""
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.tok_embeddings(tokens)
        h = h if h.dtype == mstype.float32 else h.astype(mstype.float32)  # residual stream float32 (bf16 params)
        if self.return_aux_loss and self.num_sparse:
            h, stats, sparse = layers_with_aux(self.layers, h, cos, sin, segment_ids)
            aux = moe_aux_loss(stats, tokens.shape[0] * seq * sparse, self.cfg.num_experts,
                               self.cfg.router_aux_loss_coef, self.cfg.router_z_loss_coef)
            return self.project_logits(h), aux
        for layer in self.layers:
            h = layer(h, cos, sin, segment_ids)
        if self.return_aux_loss:
            return self.project_logits(h), ops.zeros((), mstype.float32)
        return self.project_logits(h)

    def project_logits(self, h):
        """Final norm and output head: h (B, S, dim) -> logits (B, S, vocab) float32 (tied: h @ embeddings^T)."""
        h = self.norm(h)
        if self.tie_embeddings:
            return ops.matmul(h, self.tok_embeddings.weight.astype(h.dtype).T).astype(mstype.float32)
        return self.output(h).astype(mstype.float32)


def init_weights(model: nn.Cell, cfg: ModelConfig, seed: int) -> None:
    """Deterministic init from a NumPy generator (identical on every rank and backend).

    Normal(0, init_std) for embeddings and projections; wo and w2 scaled by 1/sqrt(2 * num_layers)
    (GPT-2 residual scaling); biases zero; norm weights one.
    """
    rng = np.random.default_rng(seed)
    out_std = cfg.init_std / np.sqrt(2.0 * cfg.num_layers)
    for name, param in model.parameters_and_names():
        if name.endswith("norm.weight"):
            continue
        if name.endswith(".bias"):
            value = np.zeros(param.shape, np.float32)
        else:
            std = out_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
            value = rng.normal(0.0, std, size=param.shape).astype(np.float32)
        param.set_data(Tensor(value, param.dtype))


def count_params(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameter count from the shapes alone (no allocation): usable for 7B/8B flavors."""
    hd = cfg.head_dim
    attn = cfg.dim * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * cfg.dim
    if cfg.qkv_bias:
        attn += hd * (cfg.num_heads + 2 * cfg.num_kv_heads)
    if cfg.qk_norm:
        attn += 2 * hd
    sparse = sum(cfg.is_sparse_layer(i) for i in range(cfg.num_layers))
    dense = cfg.num_layers - sparse
    total = cfg.num_layers * (attn + 2 * cfg.dim) + dense * 3 * cfg.dim * cfg.ffn_hidden_dim + cfg.dim
    if sparse:
        total += sparse * moe_param_count(cfg)[0]
    embedding = cfg.vocab_size * cfg.dim
    if not cfg.tie_embeddings:
        total += embedding
    return total + embedding if include_embedding else total


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A Transformer for `cfg` with weights from `init_weights(seed)`. Raises ConfigError naming the `model.*`
    field when cfg.validate() fails."""
    cfg.validate()
    return Transformer(cfg, seed)
