"""Export to a Hugging Face model directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Writes config.json (family from the architecture: qwen3 with q/k norm, qwen2 with q/k/v bias, else llama;
Llama 3.1 RoPE scaling kept), safetensors sharded by size (`model-0000i-of-0000n.safetensors` + index, or one
`model.safetensors`) and the source's text files as they are (tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json, special_tokens_map.json; `hf_text_files`). Tied models get no
`lm_head.weight`, as in the Hugging Face layout. The directory is written by store/files.py `write_dir_atomic`:
complete or absent, an existing non-empty output refused unless overwrite.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mindspore import dtype as mstype
from mindspore import nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError
from ascend_llm.interop.hf_config import hf_config_from_model
from ascend_llm.interop.names import to_hf
from ascend_llm.interop.safetensors_io import EXPORT_DTYPES, write_tensors
from ascend_llm.store.files import write_dir_atomic

DEFAULT_SHARD_BYTES = 5 * 2**30
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def model_weights(model: nn.Cell) -> dict[str, np.ndarray]:
    """Toolkit-named float32 arrays of a model's parameters (any parameter dtype)."""
    return {p.name: p.astype(mstype.float32).asnumpy() if p.dtype != mstype.float32 else p.asnumpy()
            for p in model.get_parameters()}


def _ffn_names(cfg: ModelConfig, i: int) -> list[str]:
    """Toolkit names of layer i's feed-forward tensors that map 1:1 (the stacked experts go through hf_moe)."""
    if not cfg.is_sparse_layer(i):
        return [f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    names = ["feed_forward.router.weight"]
    if cfg.shared_expert_ffn_hidden_dim:
        names += [f"feed_forward.shared_expert.{w}.weight" for w in ("w1", "w2", "w3")]
        names += ["feed_forward.shared_expert_gate.weight"]
    return names


def hf_tensors(cfg: ModelConfig, weights: dict[str, np.ndarray], expert_layout: str = "per_expert") \
        -> dict[str, np.ndarray]:
    """HF-named tensors in HF order (embeddings, layers, norm, head); toolkit-only tensors (optimizer or
    precision state) are left out; a missing model tensor is an InteropError. MoE experts are written in
    `expert_layout` (interop/hf_moe.py: per_expert, what Hub checkpoints hold, or fused)."""
    out = {}
    expected = ["tok_embeddings.weight"]
    for i in range(cfg.num_layers):
        layer = [f"layers.{i}.{n}" for n in ("attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
                                             "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
                                             *_ffn_names(cfg, i))]
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
    if cfg.num_experts:
        from ascend_llm.interop.hf_moe import unstack_experts

        out.update(unstack_experts(cfg, weights, expert_layout))
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


_OWN_FILES = ("config.json", "model.safetensors.index.json", "quantize_config.json")


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _json_file(text_files: dict[str, bytes], name: str) -> dict:
    if name not in text_files:
        return {}
    try:
        value = json.loads(text_files[name].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InteropError(name, "unreadable", f"must be valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InteropError(name, type(value).__name__, "must be a JSON object")
    return value


def special_token_ids(text_files: dict[str, bytes], eos_token_ids: list[int] | None = None) -> dict:
    """bos/eos/pad ids for config.json: eos from `eos_token_ids` (an int when there is one, else the list), else
    generation_config.json; bos and pad from generation_config.json; bos and eos, failing that, from
    tokenizer_config.json's tokens looked up in tokenizer.json. Ids that are unknown are left out."""
    gen = _json_file(text_files, "generation_config.json")
    ids = {key: gen.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if eos_token_ids:
        ids["eos_token_id"] = int(eos_token_ids[0]) if len(eos_token_ids) == 1 else [int(i) for i in eos_token_ids]
    tok_config = _json_file(text_files, "tokenizer_config.json")
    missing = [k for k in ("bos_token_id", "eos_token_id")
               if ids[k] is None and isinstance(tok_config.get(k[:-3]), (str, dict))]
    if missing and "tokenizer.json" in text_files:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(text_files["tokenizer.json"].decode("utf-8"))
        for key in missing:
            token = tok_config[key[:-3]]
            ids[key] = vocab.token_to_id(token.get("content") if isinstance(token, dict) else token)
    return {k: v for k, v in ids.items() if v is not None}


def hf_text_files(text_files: dict[str, bytes] | None, eos_token_ids: list[int] | None = None,
                  chat_template: str | None = None) -> dict[str, bytes]:
    """The text files an exported directory carries: the source's (`ModelSource.text_files`: tokenizer.json,
    tokenizer_config.json, chat_template.jinja, generation_config.json, special_tokens_map.json) byte for byte;
    `chat_template` (text) replaces chat_template.jinja; a generation_config.json naming the bos/eos ids is
    written when the source has none. InteropError for a name that is not a plain file name or that the export
    writes itself (config.json, weights)."""
    files = dict(text_files or {})
    for name in files:
        if "/" in name or "\\" in name or name in ("", ".", "..") or name in _OWN_FILES \
                or name.endswith(".safetensors"):
            raise InteropError("text_files", name, "must be tokenizer/chat-template/generation file names")
    if chat_template is not None:
        files["chat_template.jinja"] = chat_template.encode("utf-8")
    if "generation_config.json" not in files:
        special = special_token_ids(files, eos_token_ids)
        gen = {k: special[k] for k in ("bos_token_id", "eos_token_id") if k in special}
        if gen:
            files["generation_config.json"] = _json_bytes(gen)
    return files


def hf_directory_files(cfg: ModelConfig, dtype: str, text_files: dict[str, bytes] | None,
                       eos_token_ids: list[int] | None = None, chat_template: str | None = None,
                       quantization: dict | None = None) -> dict[str, bytes]:
    """Every non-weight file of an exported Hugging Face directory: config.json (`hf_config_from_model`, with the
    bos/eos/pad ids of the text files and `quantization_config` when given) and `hf_text_files`. Computed in
    memory, so that an export that cannot be made fails before anything is written."""
    files = hf_text_files(text_files, eos_token_ids, chat_template)
    special = special_token_ids(files, eos_token_ids)
    return {"config.json": _json_bytes(hf_config_from_model(cfg, dtype, special, quantization)), **files}


def export_hf(out_dir: str | Path, cfg: ModelConfig, weights: dict[str, np.ndarray], dtype: str = "bf16", *,
              text_files: dict[str, bytes] | None = None, eos_token_ids: list[int] | None = None,
              chat_template: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              overwrite: bool = False, field: str = "--output", protect: Iterable[Path] = (),
              expert_layout: str = "per_expert") -> Path:
    """Write a Hugging Face directory at out_dir. weights: toolkit names -> float arrays; dtype: bf16 (round to
    nearest even), fp16 or fp32; text_files: `ModelSource.text_files` (copied as they are); eos_token_ids:
    `ModelSource.eos_token_ids` (config.json's eos_token_id); chat_template: replaces the source's; overwrite,
    field, protect (the source model's path): store/files.py `write_dir_atomic`'s output rule; expert_layout:
    MoE experts per_expert (default) or fused (interop/hf_moe.py).
    Returns out_dir. InteropError for bad arguments or a missing tensor, OutputError (naming `field`) for an
    existing non-empty out_dir without overwrite or an unwritable one; nothing half-written."""
    if dtype not in EXPORT_DTYPES:
        raise InteropError("--dtype", dtype, "allowed: " + ", ".join(EXPORT_DTYPES))
    if weights is None:  # ModelSource.weights of a quantized directory
        raise InteropError("model", "quantized", "float weights are needed: export the original model, or use "
                                                 "`quantize --hf-gptq` for the quantized Hugging Face layout")
    tensors = hf_tensors(cfg, weights, expert_layout)
    files = hf_directory_files(cfg, dtype, text_files, eos_token_ids, chat_template)

    def fill(tmp: Path) -> None:
        _write_weights(tmp, tensors, dtype, max_shard_bytes)
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return write_dir_atomic(Path(out_dir), fill, overwrite=overwrite, field=field, protect=protect)
