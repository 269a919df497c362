"""The one model opener: whatever a verb or the trainer is pointed at, read the same way.

`open_model(path)` accepts
- a Hugging Face model directory (`config.json` with `architectures`/`model_type`, safetensors, tokenizer files);
- a quantized model directory written by `ascend-llm quantize` (`config.json` with `model` and `quantization`);
- a toolkit checkpoint (`.../checkpoints/step_N` with `state.json`): every file's SHA-256 is verified, the model is
  rebuilt from the recorded recipe, LoRA adapters of a `model.pretrained` run are merged into the base weights;
- a toolkit run directory (its newest checkpoint that verifies; corrupted ones are reported and skipped).

It returns a `ModelSource`: the model, its config and everything the directory says about text: the tokenizer (one
type, `HFTokenizer`), the chat template, the EOS ids (`generation_config.json`, which may list several, e.g. Llama 3's
`<|end_of_text|>` and `<|eot_id|>`), the generation defaults, and `text_files`, the bytes every writer copies along
(checkpoints, exports, quantized copies) so that a derived directory says the same about text as its source.

BOS policy: `tokenizer.encode(text)` adds special tokens as tokenizer.json's post-processor says (a completion
prompt); `tokenizer.apply_chat_template(messages)` never adds any (the template writes BOS itself).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import CheckpointError, InteropError
from ascend_llm.store.checkpoints import STATE_FILE, checkpoint_config, latest_valid_checkpoint, read_checkpoint
from ascend_llm.tokenizer.bpe import EOS
from ascend_llm.tokenizer.hf import TEXT_FILES, HFTokenizer, parse_json_object


@dataclass
class ModelSource:
    """An opened model directory.

    kind: "hf", "checkpoint" or "quantized"; path: the directory read (the step directory for a run);
    config: the architecture; model: a float32 `Transformer` in inference mode (QuantLinear layers when quantized),
    None when opened with build=False; weights: {toolkit parameter name: float32 array} (None when quantized);
    tokenizer: HFTokenizer or None (no tokenizer.json); eos_token_ids: generation stops at any of them;
    generation: generation_config.json as read (sampling defaults); text_files: {file name: bytes} of TEXT_FILES;
    quantization: the quantized layout's section or None; weight_files: the files holding the weights.
    """

    kind: str
    path: Path
    config: ModelConfig
    model: object = None
    weights: dict | None = None
    tokenizer: HFTokenizer | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    generation: dict = field(default_factory=dict)
    text_files: dict[str, bytes] = field(default_factory=dict)
    quantization: dict | None = None
    weight_files: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A display name: the directory's name (the run's name for a checkpoint of a run)."""
        return self.path.parent.parent.name if self.kind == "checkpoint" else self.path.name

    def bytes_on_disk(self) -> int:
        """Total size of `weight_files` in bytes."""
        return sum(Path(f).stat().st_size for f in self.weight_files)


def _read_text_files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in TEXT_FILES if (root / name).is_file()}


def eos_ids(generation: dict, model_config: dict, tokenizer: HFTokenizer | None, where: str) -> list[int]:
    """EOS ids: generation_config.json's eos_token_id (an int or a list), else config.json's, else the tokenizer's
    eos_token. InteropError names the file when a value is not an id of the tokenizer's vocabulary."""
    raw = generation.get("eos_token_id", model_config.get("eos_token_id"))
    values = raw if isinstance(raw, list) else ([] if raw is None else [raw])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise InteropError(f"{where}:eos_token_id", raw, "must be a token id or a list of token ids")
    ids = [int(v) for v in values]
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    if vocab is not None and any(i >= vocab for i in ids):
        raise InteropError(f"{where}:eos_token_id", raw, f"must be ids below the tokenizer's {vocab} tokens")
    return ids


def toolkit_text_files(tokenizer_json: bytes) -> dict[str, bytes]:
    """Text files that describe a toolkit-trained tokenizer the way a Hugging Face directory would: its EOS
    (`<|endoftext|>`, also the padding token), no BOS, and a generation config naming the EOS id."""
    files = {"tokenizer.json": tokenizer_json}
    tokenizer = HFTokenizer.from_files(files, Path("."))
    eos = tokenizer.tokenizer.token_to_id(EOS)
    if eos is None:
        return files
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
              "bos_token": None}
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    files["generation_config.json"] = (json.dumps({"eos_token_id": int(eos)}, indent=2) + "\n").encode()
    return files


def apply_tokenizer_override(source: ModelSource, path: str | None, field: str = "--tokenizer") -> ModelSource:
    """Replace the source's tokenizer by the tokenizer.json at `path` (a toolkit-trained one gets its EOS) when
    given; InteropError naming `field` when the file is missing, or when neither exists."""
    if path:
        file = Path(path)
        if not file.is_file():
            raise InteropError(field, str(file), "must be a tokenizer.json file (Hugging Face tokenizers format)")
        source.text_files = {k: v for k, v in source.text_files.items() if k not in ("tokenizer.json",
                                                                                   "tokenizer_config.json")}
        source.text_files.update(toolkit_text_files(file.read_bytes()))
        _text(source)
    if source.tokenizer is None:
        raise InteropError(field, None, f"{source.path} has no tokenizer.json: pass {field} FILE")
    return source


def _text(source: ModelSource, model_config: dict | None = None) -> ModelSource:
    """Fill tokenizer, generation and eos_token_ids of `source` from its text_files."""
    files, root = source.text_files, source.path
    if source.kind != "hf" and "tokenizer.json" in files and "tokenizer_config.json" not in files:
        files.update({k: v for k, v in toolkit_text_files(files["tokenizer.json"]).items() if k not in files})
    source.tokenizer = HFTokenizer.from_files(files, root) if "tokenizer.json" in files else None
    gen = "generation_config.json"
    source.generation = parse_json_object(files[gen], str(root / gen)) if gen in files else {}
    source.eos_token_ids = eos_ids(source.generation, model_config or {}, source.tokenizer,
                                   str(root / "generation_config.json"))
    return source


def _from_hf(root: Path, build: bool, weights: bool) -> ModelSource:
    from ascend_llm.interop.hf_config import model_config_from_hf
    from ascend_llm.interop.hf_files import check_config_fits, read_config, read_hf_weights, weight_files

    raw = read_config(root)
    cfg = model_config_from_hf(raw, name=root.name)
    if not weights:
        check_config_fits(cfg, root)  # sizes against the weights' headers before any model is built
    source = ModelSource("hf", root, cfg, weights=read_hf_weights(root, cfg) if weights else None,
                         text_files=_read_text_files(root), weight_files=weight_files(root))
    return _build(_text(source, raw), build)


def _from_quantized(root: Path, build: bool) -> ModelSource:
    from ascend_llm.interop.quantized import load_quantized

    model, cfg, section = load_quantized(root)
    source = ModelSource("quantized", root, cfg, model=model, text_files=_read_text_files(root),
                         quantization=section, weight_files=[root / "model.safetensors"])
    return _text(source)


def _checkpoint_weights(step: Path, meta: dict, tensors: dict,
                        weights: bool = True) -> tuple[ModelConfig, dict[str, np.ndarray] | None]:
    """(ModelConfig, full float32 weights or None when not `weights`) of a verified checkpoint; LoRA adapters
    merged into a pretrained base."""
    where = str(step / STATE_FILE)
    try:
        run_config = checkpoint_config(meta)
        saved = dict(run_config["model"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(where, "parts.run.config.model", f"must record the model config ({exc})") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError as exc:
        raise CheckpointError(where, "model config", f"unreadable ({exc})") from None
    cfg.validate()
    arrays = tensors.get("model", {})
    if not any(name.endswith(".lora_a") for name in arrays):  # sizes against the tensors before any model is built
        from ascend_llm.interop.hf_files import HF_FIELDS, check_sizes

        check_sizes(cfg, {k: v.shape for k, v in arrays.items()}, sum(v.size for v in arrays.values()), where,
                    {k: f"parts.run.config.model.{k}" for k in HF_FIELDS})
    if not weights:
        return cfg, None
    if cfg.pretrained:  # a fine-tune: base weights from the pretrained directory, adapters merged
        if not Path(cfg.pretrained).is_dir():
            raise CheckpointError(where, f"model.pretrained={cfg.pretrained}",
                                  "the base model directory of this fine-tune must exist to rebuild its weights")
        return cfg, merge_lora_tensors(run_config, arrays)
    if any(name.endswith(".lora_a") for name in arrays):
        raise CheckpointError(where, "lora adapters without model.pretrained",
                              "only a fine-tune of a pretrained directory can be rebuilt from its adapters")
    return cfg, {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def merge_lora_tensors(run_config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Full float32 model weights of a checkpoint of a `model.pretrained` run (for export).

    run_config: the run's resolved recipe as a dict (model.pretrained, lora.rank, lora.alpha). tensors: the
    checkpoint's model part, by parameter name: with LoRA only `<cell>.lora_a` (r, in) and `<cell>.lora_b`
    (out, r); without LoRA every parameter. The base comes from DIR's safetensors; each adapted weight becomes
    W + (alpha / r) B A computed in float64 (Hu et al. 2021, eq. 3), every other checkpoint tensor replaces the
    base's. InteropError names an adapter without its pair or a weight the base lacks."""
    weights = dict(open_model(run_config["model"]["pretrained"], build=False).weights)
    lora = run_config.get("lora") or {}
    scaling = float(lora.get("alpha", 0.0)) / max(int(lora.get("rank", 1)), 1)
    for name, value in tensors.items():
        if name.endswith(".lora_b"):
            continue
        if not name.endswith(".lora_a"):
            weights[name] = np.asarray(value, np.float32)
            continue
        cell = name[:-len(".lora_a")]
        if f"{cell}.lora_b" not in tensors or f"{cell}.weight" not in weights:
            raise InteropError(name, "unpaired", f"needs {cell}.lora_b and a base weight {cell}.weight")
        delta = np.asarray(tensors[f"{cell}.lora_b"], np.float64) @ np.asarray(value, np.float64)
        weights[f"{cell}.weight"] = (weights[f"{cell}.weight"].astype(np.float64) + scaling * delta).astype(np.float32)
    return weights


def _checkpoint_text(step: Path, cfg: ModelConfig) -> dict[str, bytes]:
    """The checkpoint's own text files; a fine-tune also takes those of its base directory that it lacks."""
    files = _read_text_files(step)
    if cfg.pretrained and Path(cfg.pretrained).is_dir():
        files = {**_read_text_files(Path(cfg.pretrained)), **files}
    return files


def _from_checkpoint(step: Path, meta: dict, tensors: dict, build: bool, weights: bool) -> ModelSource:
    cfg, weights = _checkpoint_weights(step, meta, tensors, weights)
    source = ModelSource("checkpoint", step, cfg, weights=weights, text_files=_checkpoint_text(step, cfg),
                         weight_files=sorted(step.glob("*.safetensors")))
    return _build(_text(source), build)


def _build(source: ModelSource, build: bool) -> ModelSource:
    if build:
        from ascend_llm.interop.hf_files import assign_weights
        from ascend_llm.models.llama import build_model

        model = build_model(source.config)
        model.return_aux_loss = False  # inference: plain logits, also for MoE models (models/llama.py Transformer)
        assign_weights(model, source.weights, source=str(source.path))
        model.set_train(False)
        source.model = model
    return source


def _is_quantized(config_file: Path) -> bool:
    """Whether config.json is the quantized layout's ({"model", "quantization"}) rather than a Hugging Face one."""
    from ascend_llm.interop.hf_files import read_config

    saved = read_config(config_file.parent)
    return "quantization" in saved and "model" in saved


def open_model(path: str | Path, *, build: bool = True, weights: bool = True, vision: bool = False) -> ModelSource:
    """Open a Hugging Face, quantized, checkpoint or run directory (see the module docstring). A CLIP/SigLIP
    directory or a contrastive run is an image-text dual encoder: with vision=True an interop.vision.VisionSource,
    else InteropError (the text verbs cannot use it).

    build=False skips building the model (export needs only weights); weights=False (implies build=False) reads
    only the architecture and the text files (a checkpoint is still verified). Raises InteropError or
    CheckpointError (one line naming the file and the field) for a directory that is none of the kinds or cannot
    be read.
    """
    root = Path(path).expanduser()
    build = build and weights
    from ascend_llm.interop.vision import open_if_vision  # CLIP/SigLIP directories, contrastive runs

    opened = open_if_vision(root, build and vision, weights and vision)
    if opened is not None:
        if not vision:
            raise InteropError("model", str(path), "is an image-text dual encoder (CLIP/SigLIP or a contrastive run), "
                                                   "not a language model")
        return opened
    if (root / "config.json").is_file():
        if _is_quantized(root / "config.json"):
            return _from_quantized(root, build)
        return _from_hf(root, build, weights)
    if (root / STATE_FILE).is_file():
        meta, tensors = read_checkpoint(root)
        return _from_checkpoint(root, meta, tensors, build, weights)
    if (root / "checkpoints").is_dir():
        found = latest_valid_checkpoint(root)
        if found is None:
            raise CheckpointError(str(root / "checkpoints"), "no valid checkpoint",
                                  "every step directory failed verification (see the warnings above)")
        step, (meta, tensors) = found
        return _from_checkpoint(step, meta, tensors, build, weights)
    raise InteropError("model", str(path), "must be a Hugging Face directory (config.json), a quantized directory "
                                           "(ascend-llm quantize), a checkpoint (state.json) or a run directory "
                                           "with checkpoints/")
