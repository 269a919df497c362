"""A LLaVA-style vision-language model: a frozen vision tower, a trainable 2-layer GELU projector into the LLM's
token-embedding space, and the LLM, with the image's tokens spliced where the prompt's placeholders are.

Liu et al. 2023 (LLaVA) and 2024 (LLaVA-1.5: `mlp2x_gelu` projector Linear -> GELU -> Linear, features of the
vision tower's second-to-last layer, `mm_vision_select_layer` -2). Image placeholders are token ids >= the LLM's
vocabulary: id vocab_size + j stands for the image's j-th patch feature, so a prompt says where the image goes and
the same ids drive training (`VisionLanguageModel`) and the paged KV-cache engine (`SplicedEmbedding`, which
replaces the LLM's `tok_embeddings` and reads the image rows set by `set_image`). Pure cells: nothing from
precision/ or parallel/.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ascend_llm.models.vision import VisionTower


class Projector(nn.Cell):
    """w2(gelu(w1 x)): (..., vision_dim) -> (..., llm_dim) (LLaVA-1.5 mlp2x_gelu; exact erf GELU)."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden_dim: int = 0, seed: int = 0):
        super().__init__()
        hidden_dim = hidden_dim or llm_dim
        self.w1 = nn.Dense(vision_dim, hidden_dim, has_bias=True)
        self.w2 = nn.Dense(hidden_dim, llm_dim, has_bias=True)
        rng = np.random.default_rng(seed)
        for dense in (self.w1, self.w2):  # torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
            bound = dense.weight.shape[1] ** -0.5
            dense.weight.set_data(Tensor(rng.uniform(-bound, bound, dense.weight.shape).astype(np.float32)))
            dense.bias.set_data(Tensor(np.zeros(dense.bias.shape, np.float32)))

    def construct(self, x):
        return self.w2(ops.gelu(self.w1(x), approximate="none"))


def splice(weight, tokens, image_rows):
    """Token embeddings with image rows spliced in: tokens (B, S) int32, id < V a row of `weight` (V, D), id V + j
    row j of image_rows (B, P, D) -> (B, S, D) in weight's dtype."""
    vocab = weight.shape[0]
    is_image = tokens >= vocab
    text = ops.gather(weight, ops.where(is_image, 0, tokens), 0)
    index = ops.where(is_image, tokens - vocab, 0)
    image = ops.gather(image_rows.astype(weight.dtype), index, 1, batch_dims=1)
    return ops.where(is_image.expand_dims(-1), image, text)


class VisionLanguageModel(nn.Cell):
    """construct(pixels (B, C, S, S) float32, tokens (B, T) int32 with image placeholders) -> logits (B, T, vocab).

    vision: a VisionTower (frozen: its parameters get requires_grad=False); llm: a dense Llama-family Transformer
    (frozen in stage 1 by the objective, LoRA-adapted in stage 2); select_layer: the tower block whose output is
    projected (-2: LLaVA's default; CLIP's class token is dropped, SigLIP has none)."""

    def __init__(self, vision: VisionTower, llm: nn.Cell, select_layer: int = -2, hidden_dim: int = 0, seed: int = 0):
        super().__init__()
        self.vision, self.llm = vision, llm
        for param in vision.get_parameters():
            param.requires_grad = False
        self.select_layer = select_layer
        self.drop_cls = vision.cfg.pooling == "cls"
        self.num_image_tokens = vision.cfg.num_patches
        self.projector = Projector(vision.cfg.dim, llm.cfg.dim, hidden_dim, seed)

    def image_rows(self, pixels):
        """pixels (B, C, S, S) -> projected patch features (B, num_image_tokens, llm dim)."""
        feats = ops.stop_gradient(self.vision.features(pixels, self.select_layer))
        if self.drop_cls:
            feats = feats[:, 1:]
        return self.projector(feats)

    def construct(self, pixels, tokens):
        h = splice(self.llm.tok_embeddings.weight, tokens, self.image_rows(pixels))
        seq = tokens.shape[1]
        cos, sin = self.llm.rope_cos[:seq], self.llm.rope_sin[:seq]
        for layer in self.llm.layers:
            h = layer(h, cos, sin, None)
        return self.llm.project_logits(h)


class SplicedEmbedding(nn.Cell):
    """Drop-in for a Transformer's tok_embeddings at inference: the same `weight` Parameter (a tied head still reads
    it) plus `image` rows (num_image_tokens, D) that ids >= vocab_size select (see `splice`); set_image fills them."""

    def __init__(self, base: nn.Cell, num_image_tokens: int):
        super().__init__()
        self.weight = base.weight
        self.num_image_tokens = num_image_tokens
        dim = base.weight.shape[1]
        self.image = Parameter(Tensor(np.zeros((num_image_tokens, dim), np.float32)), name="image_rows",
                               requires_grad=False)

    def set_image(self, rows: np.ndarray) -> None:
        """rows (num_image_tokens, D) float32: the projected image every placeholder id refers to."""
        # in place (an Assign op): a compiled engine step keeps reading this parameter's memory; set_data and
        # assign_value give it new memory the compiled graph does not see
        ops.assign(self.image, Tensor(np.asarray(rows, np.float32)))

    def construct(self, tokens):
        flat = tokens.reshape(1, -1)
        rows = self.image.astype(self.weight.dtype).expand_dims(0)
        return splice(self.weight, flat, rows).reshape(tokens.shape + (self.weight.shape[1],))
