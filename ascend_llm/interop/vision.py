"""Import Hugging Face CLIP and SigLIP directories (`CLIPModel`, `SiglipModel`): config.json, safetensors,
preprocessor_config.json and the tokenizer, into a `DualEncoder` (models/clip.py).

Name map (transformers 5.25 layout; see ../shared/fixtures/README.md "Notes for importer authors"):
`{vision,text}_model.encoder.layers.L.{self_attn.{q,k,v,out}_proj, layer_norm{1,2}, mlp.fc{1,2}}` ->
`{vision,text}.layers.L.{attention.{wq,wk,wv,wo}, {attention,ffn}_norm, feed_forward.w{1,2}}`; the patch
convolution (D, C, p, p) becomes a Dense (D, C*p*p); SigLIP's packed `head.attention.in_proj_{weight,bias}` is split
into wq/wk/wv; CLIP's 0-d `logit_scale` becomes shape (1,).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ascend_llm.config.multimodal import DualEncoderConfig, TextTowerConfig, VisionConfig
from ascend_llm.errors import ConfigError, InteropError

ARCHITECTURES = {"CLIPModel": "clip", "SiglipModel": "siglip"}
MODEL_TYPES = {"clip": "clip", "siglip": "siglip"}
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh"}
_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
          "self_attn.out_proj": "attention.wo", "layer_norm1": "attention_norm", "layer_norm2": "ffn_norm",
          "mlp.fc1": "feed_forward.w1", "mlp.fc2": "feed_forward.w2"}
_FIXED = {"vision_model.embeddings.class_embedding": "vision.class_embedding",
          "vision_model.embeddings.position_embedding.weight": "vision.position_embedding",
          "vision_model.pre_layrnorm.weight": "vision.input_norm.weight",
          "vision_model.pre_layrnorm.bias": "vision.input_norm.bias",
          "vision_model.post_layernorm.weight": "vision.post_norm.weight",
          "vision_model.post_layernorm.bias": "vision.post_norm.bias",
          "vision_model.embeddings.patch_embedding.bias": "vision.patch_embedding.bias",
          "vision_model.head.probe": "vision.head.probe",
          "vision_model.head.layernorm.weight": "vision.head.norm.weight",
          "vision_model.head.layernorm.bias": "vision.head.norm.bias",
          "vision_model.head.attention.out_proj.weight": "vision.head.attention.wo.weight",
          "vision_model.head.attention.out_proj.bias": "vision.head.attention.wo.bias",
          "vision_model.head.mlp.fc1.weight": "vision.head.feed_forward.w1.weight",
          "vision_model.head.mlp.fc1.bias": "vision.head.feed_forward.w1.bias",
          "vision_model.head.mlp.fc2.weight": "vision.head.feed_forward.w2.weight",
          "vision_model.head.mlp.fc2.bias": "vision.head.feed_forward.w2.bias",
          "text_model.embeddings.token_embedding.weight": "text.token_embedding",
          "text_model.embeddings.position_embedding.weight": "text.position_embedding",
          "text_model.final_layer_norm.weight": "text.final_norm.weight",
          "text_model.final_layer_norm.bias": "text.final_norm.bias",
          "text_model.head.weight": "text.head.weight", "text_model.head.bias": "text.head.bias",
          "visual_projection.weight": "visual_projection.weight", "text_projection.weight": "text_projection.weight",
          "logit_scale": "logit_scale", "logit_bias": "logit_bias"}
_LAYER_RE = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def family_of(raw: dict) -> str | None:
    """`clip` or `siglip` when config.json describes a CLIP/SigLIP dual encoder, else None (another family)."""
    archs = raw.get("architectures") or []
    if len(archs) == 1 and archs[0] in ARCHITECTURES:
        return ARCHITECTURES[archs[0]]
    return MODEL_TYPES.get(raw.get("model_type")) if not archs else None


def _int(section: dict, key: str, where: str, default: int | None = None) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InteropError(f"{where}.{key}", value, "must be a non-negative integer")
    return value


def _act(section: dict, where: str) -> str:
    name = section.get("hidden_act", "quick_gelu")
    if name not in ACTIVATIONS:
        raise InteropError(f"{where}.hidden_act", name, "allowed: " + ", ".join(ACTIVATIONS))
    return ACTIVATIONS[name]


def _section(raw: dict, key: str, where: str) -> dict:
    section = raw.get(key)
    if not isinstance(section, dict):
        raise InteropError(f"{where}:{key}", section, "must be an object (the tower's config)")
    return section


def dual_encoder_config(raw: dict, where: str = "config.json") -> DualEncoderConfig:
    """DualEncoderConfig from a CLIPModel/SiglipModel config.json dict (transformers' defaults where a key is absent:
    eps 1e-5 for CLIP, 1e-6 for SigLIP). InteropError names the key for an unsupported value."""
    family = family_of(raw)
    if family is None:
        raise InteropError(f"{where}:architectures", raw.get("architectures"), "allowed: " + ", ".join(ARCHITECTURES))
    siglip = family == "siglip"
    vraw, traw = _section(raw, "vision_config", where), _section(raw, "text_config", where)
    vw, tw = f"{where}:vision_config", f"{where}:text_config"
    if siglip and vraw.get("vision_use_head", True) is not True:
        raise InteropError(f"{vw}.vision_use_head", vraw.get("vision_use_head"), "only the attention-pooling head "
                                                                                 "(true) is supported")
    eps = 1e-6 if siglip else 1e-5
    vision = VisionConfig(
        image_size=_int(vraw, "image_size", vw, 224), patch_size=_int(vraw, "patch_size", vw, 32),
        num_channels=_int(vraw, "num_channels", vw, 3), dim=_int(vraw, "hidden_size", vw, 768),
        num_layers=_int(vraw, "num_hidden_layers", vw, 12), num_heads=_int(vraw, "num_attention_heads", vw, 12),
        ffn_hidden_dim=_int(vraw, "intermediate_size", vw, 3072), norm_eps=float(vraw.get("layer_norm_eps", eps)),
        activation=_act(vraw, vw), pooling="attention" if siglip else "cls", patch_bias=siglip, pre_norm=not siglip)
    eos = traw.get("eos_token_id", 2)
    text = TextTowerConfig(
        vocab_size=_int(traw, "vocab_size", tw, 49408), dim=_int(traw, "hidden_size", tw, 512),
        num_layers=_int(traw, "num_hidden_layers", tw, 12), num_heads=_int(traw, "num_attention_heads", tw, 8),
        ffn_hidden_dim=_int(traw, "intermediate_size", tw, 2048),
        max_seq_len=_int(traw, "max_position_embeddings", tw, 77), norm_eps=float(traw.get("layer_norm_eps", eps)),
        activation=_act(traw, tw), causal=not siglip,
        pooling="last" if siglip else ("argmax" if eos == 2 else "eos"), eos_token_id=_int(traw, "eos_token_id", tw, 2),
        pad_token_id=_int(traw, "pad_token_id", tw, 1),
        head_dim_out=_int(traw, "projection_size", tw, _int(traw, "hidden_size", tw, 512)) if siglip else 0)
    cfg = DualEncoderConfig(vision=vision, text=text, loss=family,
                            projection_dim=0 if siglip else _int(raw, "projection_dim", where, 512),
                            logit_scale_init=float(raw.get("logit_scale_init_value", 2.6592)),
                            logit_bias_init=-10.0)
    try:
        cfg.validate()
    except Exception as exc:
        raise InteropError(where, family, f"describes a model this importer cannot build ({exc})") from None
    return cfg


def _split_in_proj(name: str, value: np.ndarray, out: dict[str, np.ndarray]) -> None:
    kind = name.rsplit("_", 1)[-1]  # weight | bias
    for part, chunk in zip(("wq", "wk", "wv"), np.split(value, 3, axis=0)):
        out[f"vision.head.attention.{part}.{kind}"] = chunk


def toolkit_weights(tensors: dict[str, np.ndarray], cfg: DualEncoderConfig, where: str) -> dict[str, np.ndarray]:
    """{DualEncoder parameter name: float32 array} from the Hugging Face tensors; InteropError names a tensor the
    name map does not know (so nothing is silently dropped)."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        value = np.asarray(value, np.float32)
        match = _LAYER_RE.match(name)
        if match and match.group(3) in _LAYER:
            tower, layer, part, kind = match.groups()
            out[f"{tower}.layers.{layer}.{_LAYER[part]}.{kind}"] = value
        elif name == "vision_model.embeddings.patch_embedding.weight":
            out["vision.patch_embedding.weight"] = value.reshape(value.shape[0], -1)
        elif name.startswith("vision_model.head.attention.in_proj_"):
            _split_in_proj(name, value, out)
        elif name in ("logit_scale", "logit_bias"):
            out[name] = value.reshape(1)
        elif name in _FIXED:
            out[_FIXED[name]] = value
        elif name.endswith("position_ids"):
            continue  # a buffer some checkpoints carry, not a parameter
        else:
            raise InteropError(f"{where}:{name}", "unexpected", "not a CLIP/SigLIP tensor this importer knows")
    if cfg.loss == "clip":
        out.setdefault("logit_bias", np.full((1,), cfg.logit_bias_init, np.float32))
    return out


@dataclass
class VisionSource:
    """An opened CLIP/SigLIP dual encoder (Hugging Face directory, contrastive run or checkpoint, or a configured
    one to train from scratch): family (`clip`/`siglip`), config, model (a DualEncoder in inference mode, or None),
    weights {toolkit name: float32 array} or None (random init), preprocess (data.images.ImagePreprocessor),
    tokenizer (HFTokenizer), pad_to (text length of `max_length` padding: SigLIP's max_position_embeddings; 0 pads
    CLIP to the longest caption, as transformers' `padding=True`)."""

    family: str
    path: Path
    config: DualEncoderConfig
    model: object = None
    weights: dict | None = None
    preprocess: object = None
    tokenizer: object = None
    pad_to: int = 0
    weight_files: list[Path] = field(default_factory=list)
    kind: str = "vision"
    llm_config: object = None  # the LLM text tower's ModelConfig (dual_encoder.text_tower=llm), to rebuild it

    @property
    def name(self) -> str:
        """The directory's name."""
        return self.path.name

    def tokenize(self, texts: list[str], where: str = "captions", width: int | None = None):
        """(input_ids, attention_mask) (N, T) int32: the tokenizer's ids (EOS appended when it adds none), padded
        with text_config's pad id to `width`, else `pad_to`, else the longest. DataError naming `where[i]` when a
        text is longer than the tower's positions."""
        from ascend_llm.data.images import tokenize_captions

        if self.tokenizer is None:
            raise InteropError(str(self.path / "tokenizer.json"), "missing", "captions need the model's tokenizer.json "
                                                                             "(a sentencepiece-only directory: convert "
                                                                             "it with transformers' save_pretrained)")
        text = self.config.text
        return tokenize_captions(self.tokenizer, texts, text.eos_token_id, text.pad_token_id,
                                 width or self.pad_to, text.max_seq_len, where)

    def build_model(self, llm=None):
        """A DualEncoder of `config` (training mode) with `weights` assigned when there are any. With
        text_tower=llm its text tower is `llm` (a Transformer) or one built from llm_config."""
        from ascend_llm.interop.hf_files import assign_weights
        from ascend_llm.models.clip import DualEncoder, LLMTextTower

        text = None
        if self.config.text_tower == "llm":
            if llm is None:
                from ascend_llm.models.llama import build_model

                llm = build_model(self.llm_config)
            text = LLMTextTower(llm)
        model = DualEncoder(self.config, text)
        if self.weights is not None:
            assign_weights(model, self.weights, source=str(self.path))
        return model

    def corpus(self, cache_dir: str, num_tokens: int, source: str):
        """What the trainer treats as the prepared corpus: a directory holding this tokenizer's tokenizer.json
        (a cached copy named by its digest) and meta (vocab_size, num_tokens, eos_id, source)."""
        from ascend_llm.data.images import ImageCorpus, tokenizer_digest
        from ascend_llm.store.files import write_file_atomic

        data = self.tokenizer.text_files()["tokenizer.json"]
        folder = Path(cache_dir).expanduser() / "multimodal" / tokenizer_digest(data)
        if not (folder / "tokenizer.json").is_file():
            write_file_atomic(folder / "tokenizer.json", data)
        meta = {"vocab_size": self.tokenizer.vocab_size, "num_tokens": num_tokens,
                "eos_id": self.config.text.eos_token_id, "source": source}
        return ImageCorpus(folder, meta)


def _tokenizer(root: Path, files: dict[str, bytes] | None = None):
    from ascend_llm.tokenizer.hf import HFTokenizer

    if files is None:
        files = {n: (root / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")
                 if (root / n).is_file()}
    return HFTokenizer.from_files(files, root) if "tokenizer.json" in files else None


def _read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    from ascend_llm.interop.safetensors_io import read_tensors

    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_tensors(file))
    return tensors


def _finish(source: VisionSource, build: bool) -> VisionSource:
    if build and source.weights is not None:
        source.model = source.build_model()
        source.model.set_train(False)
    return source


def _from_hf(root: Path, build: bool, weights: bool) -> VisionSource:
    from ascend_llm.data.images import ImagePreprocessor
    from ascend_llm.interop.hf_files import read_config, weight_files

    cfg = dual_encoder_config(read_config(root), str(root / "config.json"))
    files = weight_files(root) if weights else []
    tokenizer = _tokenizer(root)
    if tokenizer is not None and tokenizer.pad_token_id is not None:  # what transformers pads with (openai CLIP
        cfg.text.pad_token_id = int(tokenizer.pad_token_id)          # configs say 1, their tokenizers 49407)
    source = VisionSource(cfg.loss, root, cfg, weight_files=files, tokenizer=tokenizer,
                          preprocess=ImagePreprocessor.from_dir(root, cfg.vision.image_size),
                          pad_to=cfg.text.max_seq_len if cfg.loss == "siglip" else 0)
    if weights:
        source.weights = toolkit_weights(_read_weights(files), cfg, str(files[0]))
    return _finish(source, build)


def scratch_source(cfg, data) -> VisionSource:
    """A dual encoder to train from scratch: `cfg` (MultimodalConfig) says the architecture, data.tokenizer (a
    tokenizer.json, required) the text; the text tower's EOS (pooling) and padding id are the tokenizer's
    end-of-text token (data.eos_token, default <|endoftext|>). Images: resized to image_size, mean/std 0.5."""
    import copy

    from ascend_llm.data.images import ImagePreprocessor
    from ascend_llm.tokenizer.bpe import EOS, load_tokenizer

    if not data.tokenizer:
        raise ConfigError("data.tokenizer", None, "a dual encoder trained from scratch needs a tokenizer.json "
                                                  "(or objective.multimodal.pretrained: a CLIP/SigLIP directory)")
    eos = data.eos_token or EOS
    eos_id = load_tokenizer(data.tokenizer, eos).token_to_id(eos)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos, "bos_token": None}
    files = {"tokenizer.json": Path(data.tokenizer).read_bytes(), "tokenizer_config.json": json.dumps(config).encode()}
    tokenizer = _tokenizer(Path(data.tokenizer).parent, files)
    dual = copy.deepcopy(cfg.dual_encoder)
    dual.text.eos_token_id = dual.text.pad_token_id = int(eos_id)
    if dual.text_tower == "own" and tokenizer.vocab_size > dual.text.vocab_size:
        raise ConfigError("objective.multimodal.dual_encoder.text.vocab_size", dual.text.vocab_size,
                          f"must be >= the tokenizer's {tokenizer.vocab_size} ids")
    size = dual.vision.image_size
    return VisionSource(dual.loss, Path(data.tokenizer).parent, dual, tokenizer=tokenizer, pad_to=dual.text.max_seq_len,
                        preprocess=ImagePreprocessor(size={"height": size, "width": size}))


def open_vision_text(cfg, data) -> VisionSource:
    """The dual encoder a contrastive run starts from: objective.multimodal.pretrained (a CLIP/SigLIP directory,
    weights read, not built) or one from scratch (`scratch_source`). Training pads every caption to the text
    tower's max_seq_len."""
    if cfg.pretrained:
        source = _from_hf(Path(cfg.pretrained).expanduser(), build=False, weights=True)
        source.pad_to = source.config.text.max_seq_len
        return source
    return scratch_source(cfg, data)


def is_vision_run(meta: dict) -> bool:
    """Whether a checkpoint's state.json records a contrastive run (its model is a dual encoder)."""
    try:
        run = meta["parts"]["run"]["config"]
        return run.get("objective", {}).get("name") == "contrastive"
    except (KeyError, TypeError, AttributeError):
        return False


def _recorded(cls, saved: dict):
    """An instance of the config dataclass `cls` from a run's recorded section; keys this version does not know
    are dropped, so runs of earlier versions still open."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    known = {f.name for f in fields(cls)}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls),
                                               {k: v for k, v in dict(saved or {}).items() if k in known}))


def recorded_multimodal(run: dict):
    """The MultimodalConfig a run recorded (objective.multimodal of its resolved recipe)."""
    from ascend_llm.config.multimodal import MultimodalConfig

    return _recorded(MultimodalConfig, run.get("objective", {}).get("multimodal"))


def _from_checkpoint(step: Path, meta: dict, tensors: dict, build: bool, weights: bool) -> VisionSource:
    """A contrastive run's checkpoint: the architecture from its recipe (or its pretrained directory), the
    trained tensors (`dual.` prefix dropped), its tokenizer.json."""

    from ascend_llm.config.data import DataConfig
    from ascend_llm.errors import CheckpointError
    from ascend_llm.store.checkpoints import checkpoint_config

    run = checkpoint_config(meta)
    cfg = recorded_multimodal(run)
    data = _recorded(DataConfig, run.get("data"))
    if not cfg.pretrained:
        data.tokenizer = str(step / "tokenizer.json")
    source = open_vision_text(cfg, data)
    if cfg.dual_encoder.text_tower == "llm":
        from ascend_llm.config.model import ModelConfig

        if (run.get("lora") or {}).get("enabled"):
            raise CheckpointError(str(step), "lora", "a contrastive run with a LoRA-adapted LLM text tower is not "
                                                     "opened here yet")
        source.llm_config = _recorded(ModelConfig, run.get("model"))
    source.path, source.kind = step, "checkpoint"
    source.weight_files = sorted(step.glob("*.safetensors"))
    if weights:
        trained = {k[len("dual."):]: np.asarray(v, np.float32) for k, v in tensors.get("model", {}).items()}
        # the checkpoint holds the trained tensors only; the frozen ones (logit_bias off SigLIP, the towers with
        # train_towers=false) are the pretrained directory's or the seeded initialisation's (models/clip.py)
        base = dict(source.weights or {}) or {p.name: p.asnumpy() for p in source.build_model().get_parameters()}
        base.update(trained)
        source.weights = base
    return _finish(source, build)


def load_vision_model(root: Path, build: bool = True, weights: bool = True) -> VisionSource:
    """Open a CLIP/SigLIP Hugging Face directory, or a contrastive run or checkpoint. InteropError /
    CheckpointError (one line naming the file and the field) for anything unreadable or unsupported."""
    from ascend_llm.errors import CheckpointError
    from ascend_llm.store.checkpoints import STATE_FILE, latest_valid_checkpoint, read_checkpoint

    root = Path(root).expanduser()
    if (root / "config.json").is_file():
        return _from_hf(root, build, weights)
    if (root / STATE_FILE).is_file():
        meta, tensors = read_checkpoint(root)
        return _from_checkpoint(root, meta, tensors, build, weights)
    found = latest_valid_checkpoint(root) if (root / "checkpoints").is_dir() else None
    if found is None:
        raise CheckpointError(str(root), "no model", "must be a CLIP/SigLIP directory or a contrastive run "
                                                     "with a valid checkpoint")
    step, (meta, tensors) = found
    return _from_checkpoint(step, meta, tensors, build, weights)


def _records_contrastive_run(step: Path) -> bool:
    """Whether step/state.json (read unverified: a cheap look before the opener verifies) is a contrastive run's."""
    import json

    from ascend_llm.store.checkpoints import STATE_FILE

    try:
        return is_vision_run(json.loads((step / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return False


def open_if_vision(root: Path, build: bool, weights: bool) -> VisionSource | None:
    """For interop.source.open_model: the VisionSource when `root` is a CLIP/SigLIP directory or a contrastive
    run/checkpoint, else None (another kind of model; nothing verified or read but config.json/state.json)."""
    from ascend_llm.interop.hf_files import read_config
    from ascend_llm.store.checkpoints import STATE_FILE, list_checkpoints

    root = Path(root).expanduser()
    if (root / "config.json").is_file():
        return _from_hf(root, build, weights) if family_of(read_config(root)) else None
    if (root / STATE_FILE).is_file():
        return load_vision_model(root, build, weights) if _records_contrastive_run(root) else None
    steps = list_checkpoints(root)
    if steps and _records_contrastive_run(steps[0]):
        return load_vision_model(root, build, weights)
    return None
