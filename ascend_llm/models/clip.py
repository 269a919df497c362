"""CLIP/SigLIP text tower and the dual encoder (image tower + text tower + shared embedding space).

Radford et al. 2021 (CLIP): causal text transformer, pooled at the end-of-text token, linear projections without
bias, logits = exp(logit_scale) * cos. Zhai et al. 2023 (SigLIP): bidirectional text transformer pooled at the last
position through a Linear head, logits = exp(logit_scale) * cos + logit_bias. Pure cells (no precision/parallel).
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dtype as mstype

from ascend_llm.config.multimodal import DualEncoderConfig, TextTowerConfig
from ascend_llm.models.vision import NEG_INF, EncoderBlock, LayerNorm, VisionTower, init_encoder_weights


class TextTower(nn.Cell):
    """input_ids (B, T) int32, attention_mask (B, T) int32 (1 = token, 0 = padding) ->
    (last_hidden_state (B, T, dim) after final_norm, pooled (B, dim or head_dim_out)) float32.

    Pooling: `eos` the first position where input_ids == eos_token_id, `argmax` the largest id (legacy OpenAI
    configs with eos_token_id 2), `last` position T-1 (SigLIP, then `head`). Padding keys are masked; `causal`
    adds the lower-triangular mask (CLIP)."""

    def __init__(self, cfg: TextTowerConfig, seed: int = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_embedding = Parameter(Tensor(np.zeros((cfg.vocab_size, cfg.dim), np.float32)),
                                         name="token_embedding")
        self.position_embedding = Parameter(Tensor(np.zeros((cfg.max_seq_len, cfg.dim), np.float32)),
                                            name="position_embedding")
        self.layers = nn.CellList([EncoderBlock(cfg.dim, cfg.num_heads, cfg.ffn_hidden_dim, cfg.norm_eps,
                                                cfg.activation) for _ in range(cfg.num_layers)])
        self.final_norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.has_head = cfg.head_dim_out > 0
        if self.has_head:
            self.head = nn.Dense(cfg.dim, cfg.head_dim_out, has_bias=True)
        self.causal = Tensor(np.triu(np.full((cfg.max_seq_len, cfg.max_seq_len), NEG_INF, np.float32), 1))
        init_encoder_weights(self, cfg.init_std, seed)

    def _mask(self, attention_mask, seq: int):
        keys = (1.0 - attention_mask.astype(mstype.float32)) * NEG_INF  # (B, T)
        mask = keys.reshape(keys.shape[0], 1, 1, seq)
        if self.cfg.causal:
            mask = mask + self.causal[:seq, :seq]
        return mask

    def _pool(self, h, input_ids):
        seq = input_ids.shape[1]
        if self.cfg.pooling == "last":
            return h[:, seq - 1]
        if self.cfg.pooling == "eos":
            index = ops.argmax((input_ids == self.cfg.eos_token_id).astype(mstype.int32), -1)
        else:
            index = ops.argmax(input_ids, -1)
        onehot = ops.one_hot(index, seq, Tensor(1.0, mstype.float32), Tensor(0.0, mstype.float32))
        return (h * onehot.reshape(onehot.shape[0], seq, 1)).sum(1)

    def construct(self, input_ids, attention_mask):
        """See the class docstring."""
        seq = input_ids.shape[1]
        h = ops.gather(self.token_embedding, input_ids, 0) + self.position_embedding[:seq]
        mask = self._mask(attention_mask, seq)
        for block in self.layers:
            h = block(h, mask)
        h = self.final_norm(h)
        pooled = self._pool(h, input_ids)
        if self.has_head:
            pooled = self.head(pooled)
        return h, pooled


class LLMTextTower(nn.Cell):
    """A decoder-only LLM (models/llama.py Transformer, dense) as a text tower: input_ids (B, T) int32,
    attention_mask (B, T) int32 (right padding) -> (hidden (B, T, dim) after the final norm, pooled (B, dim)) float32,
    pooled at the last real token (causal, so the whole caption has been read there; right padding changes
    nothing before it). out_dim: the LLM's width."""

    def __init__(self, llm: nn.Cell):
        super().__init__()
        self.llm = llm
        self.out_dim = llm.cfg.dim

    def construct(self, input_ids, attention_mask):
        seq = input_ids.shape[1]
        cos, sin = self.llm.rope_cos[:seq], self.llm.rope_sin[:seq]
        h = self.llm.tok_embeddings(input_ids)
        for layer in self.llm.layers:
            h = layer(h, cos, sin, None)
        h = self.llm.norm(h).astype(mstype.float32)
        last = attention_mask.astype(mstype.int32).sum(-1) - 1
        onehot = ops.one_hot(last, seq, Tensor(1.0, mstype.float32), Tensor(0.0, mstype.float32))
        return h, (h * onehot.reshape(onehot.shape[0], seq, 1)).sum(1)


def l2_normalize(x):
    """x / ||x||_2 over the last axis, no epsilon (as transformers' CLIP/SigLIP)."""
    return x / ops.sqrt((x * x).sum(-1, keepdims=True))


class DualEncoder(nn.Cell):
    """Image and text towers with projections into a shared space (`text`: another text tower cell, e.g.
    LLMTextTower, instead of cfg.text's).

    construct(pixel_values (B, C, S, S) float32, input_ids (B', T) int32, attention_mask (B', T) int32) ->
    (image_embeds (B, D), text_embeds (B', D)) L2-normalised float32. Parameters `logit_scale` (log of the
    temperature's inverse, as CLIP stores it; frozen with the cosine loss) and `logit_bias` (used by the sigmoid
    loss) are scalars of shape (1,).
    logits_per_text = exp(logit_scale) * text_embeds @ image_embeds^T (+ logit_bias for SigLIP): see `logits`.
    """

    def __init__(self, cfg: DualEncoderConfig, text: nn.Cell | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, cfg.seed)
        self.text = TextTower(cfg.text, cfg.seed + 1) if text is None else text
        self.has_projection = cfg.projection_dim > 0
        if self.has_projection:
            text_out = getattr(self.text, "out_dim", 0) or cfg.text.head_dim_out or cfg.text.dim
            self.visual_projection = nn.Dense(cfg.vision.dim, cfg.projection_dim, has_bias=cfg.projection_bias)
            self.text_projection = nn.Dense(text_out, cfg.projection_dim, has_bias=cfg.projection_bias)
            rng = np.random.default_rng(cfg.seed + 2)
            for dense in (self.visual_projection, self.text_projection):
                std = dense.weight.shape[1] ** -0.5
                dense.weight.set_data(Tensor(rng.normal(0, std, dense.weight.shape).astype(np.float32)))
                if cfg.projection_bias:
                    dense.bias.set_data(Tensor(np.zeros(dense.bias.shape, np.float32)))
        self.logit_scale = Parameter(Tensor(np.full((1,), cfg.logit_scale_init, np.float32)), name="logit_scale",
                                     requires_grad=cfg.loss != "cosine")
        self.logit_bias = Parameter(Tensor(np.full((1,), cfg.logit_bias_init, np.float32)), name="logit_bias",
                                    requires_grad=cfg.loss == "siglip")

    def encode_image(self, pixel_values):
        """(B, C, S, S) -> unnormalised image features (B, D)."""
        pooled = self.vision(pixel_values)[1]
        return self.visual_projection(pooled) if self.has_projection else pooled

    def encode_text(self, input_ids, attention_mask):
        """(B, T), (B, T) -> unnormalised text features (B, D)."""
        pooled = self.text(input_ids, attention_mask)[1]
        return self.text_projection(pooled) if self.has_projection else pooled

    def construct(self, pixel_values, input_ids, attention_mask):
        """See the class docstring."""
        return l2_normalize(self.encode_image(pixel_values)), l2_normalize(self.encode_text(input_ids, attention_mask))

    def logits(self, image_embeds, text_embeds):
        """logits_per_text (B', B) = exp(logit_scale) * text @ image^T (+ logit_bias when cfg.loss is siglip); the
        cosine similarities text @ image^T themselves when cfg.loss is cosine (no temperature)."""
        cos = ops.matmul(text_embeds, image_embeds.T)
        if self.cfg.loss == "cosine":
            return cos
        out = ops.exp(self.logit_scale) * cos
        return out + self.logit_bias if self.cfg.loss == "siglip" else out
