"""Multimodal schemas: the vision tower, the CLIP/SigLIP text tower, the dual encoder, and the objective settings of
contrastive alignment and LLaVA-style captioning (recipe key `objective.multimodal`).

Plain dataclasses (OmegaConf structured configs); each `validate(prefix)` raises ConfigError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ascend_llm.config.checks import in_range, non_negative, one_of, positive
from ascend_llm.errors import ConfigError

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
VISION_POOLING = ("cls", "attention")  # CLIP's class token; SigLIP's attention-pooling head
TEXT_POOLING = ("eos", "argmax", "last")  # first eos_token_id; argmax id (legacy OpenAI CLIP); last position
LOSSES = ("clip", "siglip", "cosine")  # cosine: the seed's MultimodalAligner (train/contrastive.py)


@dataclass
class VisionConfig:
    """ViT tower. CLIP: class token, `pre_norm`, post-norm of the class token, no patch bias (pooling=cls);
    SigLIP: no class token, patch bias, post-norm on every token, attention-pooling head (pooling=attention)."""

    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_dim: int = 128
    norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    pooling: str = "cls"
    patch_bias: bool = False
    pre_norm: bool = True
    init_std: float = 0.02

    @property
    def num_patches(self) -> int:
        """(image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Patches plus the class token (pooling=cls)."""
        return self.num_patches + (1 if self.pooling == "cls" else 0)

    def validate(self, prefix: str = "vision") -> None:
        """ConfigError naming the field: sizes not > 0, image_size not a multiple of patch_size, dim not a multiple
        of num_heads, unknown activation or pooling."""
        for name in ("image_size", "patch_size", "num_channels", "dim", "num_layers", "num_heads", "ffn_hidden_dim"):
            positive(f"{prefix}.{name}", getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(f"{prefix}.image_size", self.image_size, f"must be a multiple of patch_size "
                                                                       f"({self.patch_size})")
        if self.dim % self.num_heads:
            raise ConfigError(f"{prefix}.dim", self.dim, f"must be a multiple of num_heads ({self.num_heads})")
        one_of(f"{prefix}.activation", self.activation, ACTIVATIONS)
        one_of(f"{prefix}.pooling", self.pooling, VISION_POOLING)
        positive(f"{prefix}.norm_eps", self.norm_eps)


@dataclass
class TextTowerConfig:
    """CLIP/SigLIP text encoder: learned positions, pre-norm blocks, final LayerNorm, pooling, optional head
    (SigLIP's Linear with bias to `head_dim_out`; 0 = none)."""

    vocab_size: int = 512
    dim: int = 48
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_dim: int = 96
    max_seq_len: int = 32
    norm_eps: float = 1e-5
    activation: str = "quick_gelu"
    causal: bool = True
    pooling: str = "eos"
    eos_token_id: int = 1
    pad_token_id: int = 1
    head_dim_out: int = 0
    init_std: float = 0.02

    def validate(self, prefix: str = "text") -> None:
        """ConfigError naming the field (sizes, activation, pooling)."""
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "ffn_hidden_dim", "max_seq_len"):
            positive(f"{prefix}.{name}", getattr(self, name))
        if self.dim % self.num_heads:
            raise ConfigError(f"{prefix}.dim", self.dim, f"must be a multiple of num_heads ({self.num_heads})")
        one_of(f"{prefix}.activation", self.activation, ACTIVATIONS)
        one_of(f"{prefix}.pooling", self.pooling, TEXT_POOLING)
        non_negative(f"{prefix}.head_dim_out", self.head_dim_out)


@dataclass
class DualEncoderConfig:
    """Image and text towers, projections into a shared space of `projection_dim` (0: none, SigLIP's towers end in
    their own heads), the learnable logit scale (its log, as stored: CLIP ln(1/0.07) = 2.6592) and, for the
    sigmoid loss, the learnable logit bias (SigLIP's -10 at init)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    projection_dim: int = 32
    # own: the CLIP/SigLIP text tower of `text`; llm: the run's LLM (model group, or model.pretrained) pooled at the
    # last real token of each caption (models/clip.py LLMTextTower), trained with the rest
    text_tower: str = "own"
    loss: str = "clip"
    logit_scale_init: float = 2.6592
    logit_bias_init: float = -10.0
    # loss=cosine (train/contrastive.py cosine_loss): the in-batch pairs whose text is not the image's caption are
    # negatives, hinged at cosine_margin (torch CosineEmbeddingLoss's margin); false: the matched pairs' 1 - cos only
    cosine_negatives: bool = True
    cosine_margin: float = 0.0
    projection_bias: bool = False  # the projections' bias (CLIP: none; the seed's aligner: nn.Dense's default, on)
    seed: int = 0

    def validate(self, prefix: str = "dual_encoder") -> None:
        """Validates both towers; ConfigError naming the field for the loss or a missing shared space."""
        self.vision.validate(f"{prefix}.vision")
        self.text.validate(f"{prefix}.text")
        one_of(f"{prefix}.loss", self.loss, LOSSES)
        in_range(f"{prefix}.cosine_margin", self.cosine_margin, -1.0, 1.0)
        one_of(f"{prefix}.text_tower", self.text_tower, ("own", "llm"))
        if self.text_tower == "llm" and self.projection_dim == 0:
            raise ConfigError(f"{prefix}.projection_dim", 0, "must be > 0 with text_tower=llm (the LLM's width and "
                                                             "the image's differ)")
        non_negative(f"{prefix}.projection_dim", self.projection_dim)
        if self.projection_dim == 0 and self.text.head_dim_out != self._image_dim():
            raise ConfigError(f"{prefix}.projection_dim", 0, f"needs text.head_dim_out == the image embedding width "
                                                             f"({self._image_dim()}) when there is no projection")

    def _image_dim(self) -> int:
        return self.vision.dim


@dataclass
class MultimodalConfig:
    """Objective settings (recipe key `objective.multimodal`).

    images: JSON Lines of {"image": path, "caption": text} (paths relative to the file); val_images: a held-out
    file (else the last `val_fraction` of `images`). dual_encoder: the model `objective.name=contrastive` trains
    from scratch, unless `pretrained` names a CLIP/SigLIP Hugging Face directory to start from. gather_features: all
    data-parallel ranks' features form the contrastive batch (OpenCLIP's gather_with_grad). recall_at: the k of
    retrieval recall@k. For `objective.name=caption`: vision_pretrained, the frozen vision tower (a CLIP/SigLIP
    directory or a contrastive run); prompt, where `<image>` puts the image tokens; max_caption_tokens, caption
    tokens per pair (EOS excluded); projector_hidden_dim, the projector's hidden width (0: the LLM's dim);
    select_layer, the vision block whose output is projected (-2, LLaVA's); projector_from, a caption run or
    checkpoint whose projector this run starts from (stage 2, with lora.enabled). on_bad_record: `error` (exit 2 naming
    file and field) or `skip` (counted). train_towers (contrastive): false freezes both towers (the LLM too with
    text_tower=llm) so that only the projections (and logit scale/bias) train, the seed's MultimodalAligner.
    """

    images: Optional[str] = None
    val_images: Optional[str] = None
    val_fraction: float = 0.1
    dual_encoder: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    pretrained: Optional[str] = None
    vision_pretrained: Optional[str] = None
    gather_features: bool = True
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    prompt: str = "<image>"
    max_caption_tokens: int = 16
    projector_hidden_dim: int = 0
    select_layer: int = -2
    projector_from: Optional[str] = None
    on_bad_record: str = "error"
    train_towers: bool = True

    def validate(self, prefix: str = "objective.multimodal") -> None:
        """ConfigError naming the field."""
        self.dual_encoder.validate(f"{prefix}.dual_encoder")
        in_range(f"{prefix}.val_fraction", self.val_fraction, 0.0, 0.9)
        one_of(f"{prefix}.on_bad_record", self.on_bad_record, ("error", "skip"))
        positive(f"{prefix}.max_caption_tokens", self.max_caption_tokens)
        non_negative(f"{prefix}.projector_hidden_dim", self.projector_hidden_dim)
        if not self.train_towers and self.dual_encoder.projection_dim == 0:
            raise ConfigError(f"{prefix}.train_towers", False, "needs dual_encoder.projection_dim > 0 (the "
                                                              "projections are what trains with frozen towers)")
        if "<image>" not in self.prompt:
            raise ConfigError(f"{prefix}.prompt", self.prompt, "must contain <image> where the image tokens go")
        if not self.recall_at or any(k < 1 for k in self.recall_at):
            raise ConfigError(f"{prefix}.recall_at", list(self.recall_at), "must be a non-empty list of ranks >= 1")
