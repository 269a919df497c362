"""Export to a Hugging Face model directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Writes config.json (family from the architecture: qwen3 with q/k norm, qwen2 with q/k/v bias, else llama),
generation_config.json, safetensors sharded by size (`model-0000i-of-0000n.safetensors` + index, or one
`model.safetensors`), tokenizer files and the chat template. Tied models get no `lm_head.weight`, as in the
Hugging Face layout. The directory is written under a temporary name and renamed: complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
from mindspore import dtype as mstype
from mindspore import nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError
from ascend_llm.interop.hf_config import hf_config_from_model
from ascend_llm.interop.names import to_hf
from ascend_llm.interop.safetensors_io import EXPORT_DTYPES, read_tensors, write_tensors
from ascend_llm.interop.tokenizer import HFTokenizer
from ascend_llm.train.checkpoint import checkpoint_config

DEFAULT_SHARD_BYTES = 5 * 2**30
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def model_weights(model: nn.Cell) -> dict[str, np.ndarray]:
    """Toolkit-named float32 arrays of a model's parameters (any parameter dtype)."""
    return {p.name: p.astype(mstype.float32).asnumpy() if p.dtype != mstype.float32 else p.asnumpy()
            for p in model.get_parameters()}


def checkpoint_model_tensors(step_dir: Path) -> dict[str, np.ndarray]:
    """The model tensors of one toolkit checkpoint directory, by parameter name (the only place that knows
    where a checkpoint keeps them: today `model.safetensors`)."""
    file = Path(step_dir) / "model.safetensors"
    if not file.is_file():
        raise InteropError(str(file), "missing", "a toolkit checkpoint directory holds model.safetensors")
    return read_tensors(file)


def read_toolkit_checkpoint(step_dir: Path) -> tuple[ModelConfig, dict[str, np.ndarray], Path | None]:
    """(ModelConfig from state.json's resolved recipe, full model tensors, the checkpoint's tokenizer.json or
    None). For a `model.pretrained` run the base comes from that directory and LoRA adapters are merged."""
    step_dir = Path(step_dir)
    state_file = step_dir / "state.json"
    try:
        state = json.loads(state_file.read_text())
        run_config = checkpoint_config(state)
        model_dict = run_config["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InteropError(str(state_file), "unreadable", f"must be JSON with config.model ({exc})") from None
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model_dict.items() if k in known})
    cfg.validate()
    tensors = checkpoint_model_tensors(step_dir)
    if cfg.pretrained:  # a fine-tune: the base weights live in the pretrained directory; LoRA adapters merge
        from ascend_llm.interop.pretrained import merge_lora_tensors

        tensors = merge_lora_tensors(run_config, tensors)
    tokenizer = step_dir / "tokenizer.json"  # every checkpoint keeps a copy of its run's tokenizer
    return cfg, tensors, tokenizer if tokenizer.is_file() else None


def hf_tensors(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-named tensors in HF order (embeddings, layers, norm, head); toolkit-only tensors (optimizer or
    precision state) are left out; a missing model tensor is an InteropError."""
    out = {}
    expected = ["tok_embeddings.weight"]
    for i in range(cfg.num_layers):
        layer = [f"layers.{i}.{n}" for n in ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
                                             "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
                                             "feed_forward.w1.weight", "feed_forward.w2.weight",
                                             "feed_forward.w3.weight")]
        if cfg.qkv_bias:
            layer += [f"layers.{i}.attention.{w}.bias" for w in ("wq", "wk", "wv")]
        if cfg.qk_norm:
            layer += [f"layers.{i}.attention.{w}.weight" for w in ("q_norm", "k_norm")]
        expected += layer
    expected += ["norm.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
    for name in expected:
        if name not in weights:
            raise InteropError(f"weights:{name}", "missing", "every model tensor is needed for export")
        out[to_hf(name)] = np.asarray(weights[name], np.float32)
    return out


def shard(tensors: dict[str, np.ndarray], dtype: str, max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Consecutive groups of tensors of at most max_shard_bytes each (a bigger tensor gets its own shard)."""
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        nbytes = value.size * _BYTES[dtype]
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += nbytes
    return shards + [current] if current else shards


def _write_weights(out: Path, tensors: dict[str, np.ndarray], dtype: str, max_shard_bytes: int) -> None:
    groups = shard(tensors, dtype, max_shard_bytes)
    st_dtype = EXPORT_DTYPES[dtype]
    if len(groups) == 1:
        write_tensors(out / "model.safetensors", groups[0], st_dtype, {"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_tensors(out / name, group, st_dtype, {"format": "pt"})
        weight_map.update({k: name for k in group})
        total += sum(v.size * _BYTES[dtype] for v in group.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _tokenizer_files(out: Path, tokenizer: HFTokenizer | None, chat_template: str | None) -> dict:
    """Write tokenizer files; returns the special token ids for config.json / generation_config.json."""
    if tokenizer is None:
        return {}
    tokenizer.save(out)
    if chat_template:
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def export_hf(out_dir: str | Path, cfg: ModelConfig, weights: dict[str, np.ndarray], dtype: str = "bf16",
              tokenizer: HFTokenizer | None = None, chat_template: str | None = None,
              generation_config: dict | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a Hugging Face directory at out_dir (must not exist or be empty). weights: toolkit names ->
    float arrays; dtype: bf16 (round to nearest even), fp16 or fp32; tokenizer: an HFTokenizer or None.
    Returns out_dir. InteropError for bad arguments; nothing half-written."""
    if dtype not in EXPORT_DTYPES:
        raise InteropError("--dtype", dtype, "allowed: " + ", ".join(EXPORT_DTYPES))
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError("--output", str(out), "must not exist or be an empty directory")
    tensors = hf_tensors(cfg, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_weights(tmp, tensors, dtype, max_shard_bytes)
        special = {k: v for k, v in _tokenizer_files(tmp, tokenizer, chat_template).items() if v is not None}
        (tmp / "config.json").write_text(json.dumps(hf_config_from_model(cfg, dtype, special), indent=2) + "\n")
        gen = dict(generation_config or {})
        gen.pop("eos_token_ids", None)
        gen.setdefault("eos_token_id", special.get("eos_token_id"))
        if special.get("bos_token_id") is not None:
            gen.setdefault("bos_token_id", special["bos_token_id"])
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                               indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
