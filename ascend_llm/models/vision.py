"""Vision Transformer tower (CLIP and SigLIP) and the encoder pieces the text towers share, as pure MindSpore cells.

Dosovitskiy et al. 2021 (ViT); Radford et al. 2021 (CLIP: class token, pre-LayerNorm, quick_gelu); Zhai et al. 2023
(SigLIP: no class token, attention-pooling head "MAP" with a learned probe). Sub-cell names follow the toolkit's
(`wq wk wv wo`, `w1 w2`, `attention_norm`, `ffn_norm`); interop/vision.py maps Hugging Face names onto them.
Math is float32 throughout; this module imports nothing from precision/ or parallel/.
"""

from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.multimodal import VisionConfig

NEG_INF = -1e9  # additive mask value for a disallowed key (exp underflows to exactly 0 in float32)


class LayerNorm(nn.Cell):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance, as torch.nn.LayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones(dim, np.float32)), name="weight")
        self.bias = Parameter(Tensor(np.zeros(dim, np.float32)), name="bias")

    def construct(self, x):
        """x (..., dim) float32 -> (..., dim) float32."""
        mean = x.mean(-1, keep_dims=True)
        centered = x - mean
        var = (centered * centered).mean(-1, keep_dims=True)
        return centered * ops.rsqrt(var + self.eps) * self.weight + self.bias


def activation(name: str):
    """The function for `name`: quick_gelu x*sigmoid(1.702x) (CLIP), gelu (erf), gelu_tanh (SigLIP's
    gelu_pytorch_tanh: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))))."""
    if name == "quick_gelu":
        return lambda x: x * ops.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: ops.gelu(x, approximate="none")
    return lambda x: ops.gelu(x, approximate="tanh")


class MLP(nn.Cell):
    """w2(act(w1 x)), both with bias."""

    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.w1 = nn.Dense(dim, hidden_dim, has_bias=True)
        self.w2 = nn.Dense(hidden_dim, dim, has_bias=True)
        self.act = activation(act)

    def construct(self, x):
        """x (..., dim) -> (..., dim)."""
        return self.w2(self.act(self.w1(x)))


class EncoderAttention(nn.Cell):
    """Multi-head attention with biases: softmax(q k^T / sqrt(d) + mask) v, then `wo` (Vaswani et al. 2017).

    Query and key/value inputs may differ (the pooling head's probe attends over the patch tokens)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.wq = nn.Dense(dim, dim, has_bias=True)
        self.wk = nn.Dense(dim, dim, has_bias=True)
        self.wv = nn.Dense(dim, dim, has_bias=True)
        self.wo = nn.Dense(dim, dim, has_bias=True)

    def _heads(self, x):
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, mask=None, kv=None):
        """x (B, Sq, dim); kv (B, Sk, dim) or None (= x); mask additive float32 broadcasting to (B, 1, Sq, Sk) or
        None -> (B, Sq, dim)."""
        kv = x if kv is None else kv
        q, k, v = self._heads(self.wq(x)), self._heads(self.wk(kv)), self._heads(self.wv(kv))
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale
        if mask is not None:
            scores = scores + mask
        out = ops.matmul(ops.softmax(scores, -1), v)
        batch, _, seq, _ = out.shape
        return self.wo(out.transpose(0, 2, 1, 3).reshape(batch, seq, self.num_heads * self.head_dim))


class EncoderBlock(nn.Cell):
    """Pre-norm encoder layer: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, eps: float, act: str):
        super().__init__()
        self.attention_norm = LayerNorm(dim, eps)
        self.attention = EncoderAttention(dim, num_heads)
        self.ffn_norm = LayerNorm(dim, eps)
        self.feed_forward = MLP(dim, hidden_dim, act)

    def construct(self, x, mask=None):
        """x (B, S, dim), additive mask or None -> (B, S, dim)."""
        h = x + self.attention(self.attention_norm(x), mask)
        return h + self.feed_forward(self.ffn_norm(h))


def patchify(pixel_values, patch_size: int):
    """(B, C, H, W) -> (B, (H/p)(W/p), C*p*p), patches in row-major order, each flattened as (C, p, p): the order of
    a stride-p convolution's weight (out, C, p, p), so a Dense on it equals ViT's patch convolution."""
    batch, channels, height, width = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    x = pixel_values.reshape(batch, channels, rows, patch_size, cols, patch_size)
    x = x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, rows * cols, channels * patch_size * patch_size)


class AttentionPoolingHead(nn.Cell):
    """SigLIP's multihead attention pooling: a learned probe attends over the tokens, then out + MLP(LN(out)); the
    probe's row is the pooled output (transformers SiglipMultiheadAttentionPoolingHead)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = Parameter(Tensor(np.zeros((1, 1, cfg.dim), np.float32)), name="probe")
        self.attention = EncoderAttention(cfg.dim, cfg.num_heads)
        self.norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MLP(cfg.dim, cfg.ffn_hidden_dim, cfg.activation)

    def construct(self, h):
        """h (B, N, dim) -> (B, dim)."""
        probe = ops.broadcast_to(self.probe, (h.shape[0], 1, h.shape[2]))
        out = self.attention(probe, None, h)
        out = out + self.feed_forward(self.norm(out))
        return out[:, 0]


class VisionTower(nn.Cell):
    """ViT: pixel_values (B, C, S, S) float32 -> (last_hidden_state (B, T, dim), pooled (B, dim)) float32.

    CLIP (pooling=cls): T = patches + 1, class token first; last_hidden_state is the encoder output before
    `post_norm`; pooled = post_norm(class token). SigLIP (pooling=attention): T = patches; last_hidden_state is
    after `post_norm`; pooled = the attention-pooling head's output. `features(pixel_values, layer)` gives the
    hidden states after block `layer` (negative counts from the end), what a LLaVA projector reads.
    """

    def __init__(self, cfg: VisionConfig, seed: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_size, self.use_cls = cfg.patch_size, cfg.pooling == "cls"
        patch_in = cfg.num_channels * cfg.patch_size * cfg.patch_size
        self.patch_embedding = nn.Dense(patch_in, cfg.dim, has_bias=cfg.patch_bias)
        if self.use_cls:
            self.class_embedding = Parameter(Tensor(np.zeros(cfg.dim, np.float32)), name="class_embedding")
        self.position_embedding = Parameter(Tensor(np.zeros((cfg.num_positions, cfg.dim), np.float32)),
                                            name="position_embedding")
        self.pre_norm = cfg.pre_norm
        if cfg.pre_norm:
            self.input_norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.layers = nn.CellList([EncoderBlock(cfg.dim, cfg.num_heads, cfg.ffn_hidden_dim, cfg.norm_eps,
                                                cfg.activation) for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(cfg.dim, cfg.norm_eps)
        if not self.use_cls:
            self.head = AttentionPoolingHead(cfg)
        init_encoder_weights(self, cfg.init_std, seed)

    def embed(self, pixel_values):
        """pixel_values (B, C, S, S) -> token embeddings with positions (B, T, dim), input-normed when pre_norm."""
        h = self.patch_embedding(patchify(pixel_values.astype(mstype.float32), self.patch_size))
        if self.use_cls:
            cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (h.shape[0], 1, h.shape[2]))
            h = ops.concat((cls, h), 1)
        h = h + self.position_embedding
        return self.input_norm(h) if self.pre_norm else h

    def features(self, pixel_values, layer: int = -1):
        """Hidden states after block `layer` (B, T, dim): -1 is the last block's output (no post_norm), -2 the one
        before it (LLaVA's mm_vision_select_layer -2)."""
        h = self.embed(pixel_values)
        stop = layer % len(self.layers) + 1
        for block in self.layers[:stop]:
            h = block(h)
        return h

    def construct(self, pixel_values):
        """See the class docstring."""
        h = self.embed(pixel_values)
        for block in self.layers:
            h = block(h)
        if self.use_cls:
            return h, self.post_norm(h[:, 0])
        h = self.post_norm(h)
        return h, self.head(h)


def init_encoder_weights(model: nn.Cell, std: float, seed: int) -> None:
    """Deterministic init from a NumPy generator: Normal(0, std) for weights, embeddings and the probe; biases
    zero; LayerNorm weights one (`*norm.weight`)."""
    rng = np.random.default_rng(seed)
    for name, param in model.parameters_and_names():
        if name.endswith("norm.weight"):
            continue
        if name.endswith(".bias"):
            value = np.zeros(param.shape, np.float32)
        else:
            value = rng.normal(0.0, std, size=param.shape).astype(np.float32)
        param.set_data(Tensor(value, param.dtype))
