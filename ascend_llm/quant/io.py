"""Quantized model directories: our own layout (save/load) and the Hugging Face GPTQ layout (export).

Ours (`save_quantized`): model.safetensors with every parameter under its full name (`<layer>.qweight` uint8,
int4 packed two per byte; `<layer>.scales` float16 (out, G); `<layer>.zeros` uint8 when asymmetric;
`<layer>.g_idx` int32 with act-order; other tensors float32), config.json {"model": ModelConfig fields,
"quantization": {method, bits, group_size, sym, act_order, damp_percent, layers}}, tokenizer.json when given.
Written into a temporary directory and renamed into place.

Hugging Face GPTQ (`export_hf_gptq`, AutoGPTQ/optimum `QuantLinear` buffers, weights transposed to (in, out)):
  qweight (in * bits / 32, out) int32 packed along in; qzeros (G, out * bits / 32) int32 packed along out;
  scales (G, out) float16; g_idx (in,) int32; config.json `quantization_config` {quant_method: "gptq", bits,
  group_size, desc_act, sym, damp_percent, checkpoint_format}. checkpoint_format "gptq" stores zero - 1 (the
  AutoGPTQ v1 convention, used for symmetric grids); asymmetric grids (zero can be 0) use "gptq_v2", zero as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ascend_llm.config.model import ModelConfig
from ascend_llm.config.quant import QuantConfig
from ascend_llm.errors import CheckpointError
from ascend_llm.quant.pack import pack_int32, unpack_int4
from ascend_llm.quant.rtn import QuantizedWeight

HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def _write_dir(out_dir: Path, files: dict) -> Path:
    """files: {name: bytes | dict of arrays (safetensors)}; written to a temp dir, fsynced, renamed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is meant to be shared
    try:
        for name, content in files.items():
            path = tmp / name
            if isinstance(content, dict):
                save_file(content, str(path))
            else:
                path.write_bytes(content)
            os.chmod(path, 0o644)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def quant_section(cfg: QuantConfig, layers: list[str]) -> dict:
    return {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
            "act_order": cfg.act_order, "damp_percent": cfg.damp_percent, "layers": sorted(layers)}


def save_quantized(model, model_cfg: ModelConfig, cfg: QuantConfig, layers: list[str], out_dir: Path,
                   tokenizer_file: Path | None = None) -> Path:
    """Write a quantized model (after apply_quantization) in our layout; returns the directory."""
    tensors = {name: np.ascontiguousarray(p.asnumpy()) for name, p in model.parameters_and_names()}
    config = {"model": dataclasses.asdict(model_cfg), "quantization": quant_section(cfg, layers)}
    files = {"model.safetensors": tensors, "config.json": _json(config)}
    if tokenizer_file is not None:
        files["tokenizer.json"] = Path(tokenizer_file).read_bytes()
    return _write_dir(out_dir, files)


def read_quantized_weight(tensors: dict, path: str, section: dict, out_f: int, in_f: int) -> QuantizedWeight:
    """Rebuild a QuantizedWeight from saved tensors; CheckpointError names a missing or misshapen tensor."""
    bits, sym = section["bits"], section["sym"]
    try:
        packed, scales = tensors[f"{path}.qweight"], tensors[f"{path}.scales"]
        codes = unpack_int4(packed) if bits == 4 else packed.astype(np.uint8)
        zeros = (np.full(scales.shape, 2 ** (bits - 1), np.uint8) if sym else tensors[f"{path}.zeros"])
    except KeyError as exc:
        raise CheckpointError(f"model.safetensors[{exc.args[0]}]", "missing", "a quantized layer needs it")
    if codes.shape != (out_f, in_f):
        raise CheckpointError(f"model.safetensors[{path}.qweight]", packed.shape,
                              f"must unpack to ({out_f}, {in_f}) for int{bits}")
    g_idx = tensors.get(f"{path}.g_idx")
    return QuantizedWeight(codes, scales, zeros.astype(np.uint8), bits, section["group_size"], sym, g_idx)


def load_quantized(directory: Path):
    """(model with QuantLinear layers, ModelConfig, quantization section) from `save_quantized`'s layout."""
    from mindspore import Tensor

    from ascend_llm.models.llama import build_model
    from ascend_llm.precision.policy import replace_cell, sync_parameter_names
    from ascend_llm.quant.linear import QuantLinear

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
        model_cfg, section = ModelConfig(**config["model"]), config["quantization"]
        tensors = load_file(str(directory / "model.safetensors"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(str(directory), "unreadable", f"needs config.json (model, quantization) and "
                              f"model.safetensors ({exc})") from None
    model = build_model(model_cfg)
    cells = dict(model.cells_and_names())
    for path in section["layers"]:
        dense = cells.get(path)
        if dense is None:
            raise CheckpointError("config.json quantization.layers", path, "must name Dense cells of the model")
        out_f, in_f = dense.weight.shape
        qw = read_quantized_weight(tensors, path, section, out_f, in_f)
        replace_cell(model, path, QuantLinear(qw, tensors.get(f"{path}.bias")))
    sync_parameter_names(model)
    for name, param in model.parameters_and_names():
        if name not in tensors:
            raise CheckpointError(f"model.safetensors[{name}]", "missing", "every model parameter must be saved")
        param.set_data(Tensor(tensors[name]))
    return model, model_cfg, section


def hf_name(path: str) -> str:
    """Our cell path -> the Llama-family Hugging Face module name."""
    if path == "output":
        return "lm_head"
    if path == "tok_embeddings":
        return "model.embed_tokens"
    if path == "norm":
        return "model.norm"
    parts = path.split(".")
    return f"model.layers.{parts[1]}." + HF_NAMES[".".join(parts[2:])]


def hf_gptq_tensors(qw: QuantizedWeight, checkpoint_format: str) -> dict[str, np.ndarray]:
    """qweight, qzeros, scales, g_idx of one layer in the AutoGPTQ layout (see the module docstring)."""
    zeros = qw.zeros.T.astype(np.int64)  # (G, out)
    if checkpoint_format == "gptq":
        zeros = (zeros - 1) & (2 ** qw.bits - 1)
    return {"qweight": pack_int32(qw.codes.T, qw.bits, 0), "qzeros": pack_int32(zeros, qw.bits, 1),
            "scales": np.ascontiguousarray(qw.scales.T.astype(np.float16)),
            "g_idx": qw.group_of_column().astype(np.int32)}


def export_hf_gptq(model, model_cfg: ModelConfig, cfg: QuantConfig, qweights: dict[str, QuantizedWeight],
                   out_dir: Path, tokenizer_file: Path | None = None) -> Path:
    """Write a Hugging Face GPTQ directory (model.safetensors, config.json with quantization_config,
    quantize_config.json, tokenizer.json). Unquantized tensors are written in float16."""
    fmt = "gptq" if cfg.sym else "gptq_v2"
    tensors = {}
    for name, param in model.parameters_and_names():
        cell, leaf = name.rsplit(".", 1)
        if cell in qweights:
            continue
        tensors[f"{hf_name(cell)}.{leaf}"] = param.asnumpy().astype(np.float16)
    for path, qw in qweights.items():
        for key, value in hf_gptq_tensors(qw, fmt).items():
            tensors[f"{hf_name(path)}.{key}"] = value
    group = -1 if cfg.group_size == -1 else cfg.group_size
    qconfig = {"quant_method": "gptq", "bits": cfg.bits, "group_size": group, "desc_act": cfg.act_order,
               "sym": cfg.sym, "damp_percent": cfg.damp_percent, "true_sequential": False,
               "static_groups": False, "checkpoint_format": fmt}
    m = model_cfg
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
              "hidden_size": m.dim, "intermediate_size": m.ffn_hidden_dim, "num_hidden_layers": m.num_layers,
              "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
              "max_position_embeddings": m.max_seq_len, "rope_theta": m.rope_theta, "rms_norm_eps": m.norm_eps,
              "attention_bias": m.qkv_bias, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
              "torch_dtype": "float16", "quantization_config": qconfig}
    files = {"model.safetensors": tensors, "config.json": _json(config), "quantize_config.json": _json(qconfig)}
    if tokenizer_file is not None:
        files["tokenizer.json"] = Path(tokenizer_file).read_bytes()
    return _write_dir(out_dir, files)
