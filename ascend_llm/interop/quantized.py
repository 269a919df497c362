"""Quantized model directories, the disk side of quant/: our own layout (save/load) and the Hugging Face GPTQ
layout (export).

Ours (`save_quantized`): model.safetensors with every parameter under its full name (`<layer>.qweight` uint8,
int4 packed two per byte; `<layer>.scales` float16 (out, G); `<layer>.zeros` uint8 when asymmetric;
`<layer>.g_idx` int32 with act-order; other tensors float32), config.json {"model": ModelConfig fields,
"quantization": {method, bits, group_size, sym, act_order, damp_percent, layers}}, and the source's text files
(tokenizer, chat template, generation config with the EOS ids; interop/export.py `hf_text_files`).

Hugging Face GPTQ (`export_hf_gptq`, AutoGPTQ/optimum `QuantLinear` buffers, weights transposed to (in, out)):
  qweight (in * bits / 32, out) int32 packed along in; qzeros (G, out * bits / 32) int32 packed along out;
  scales (G, out) float16; g_idx (in,) int32; config.json of the source's family (interop/hf_config.py
  `hf_config_from_model`, the same builder as `convert --to hf`) with `quantization_config` {quant_method: "gptq",
  bits, group_size, desc_act, sym, damp_percent, checkpoint_format}; tensor names from interop/names.py.
  checkpoint_format "gptq" stores zero - 1 (the AutoGPTQ v1 convention, used for symmetric grids); asymmetric
  grids (zero can be 0) use "gptq_v2", zero as is.

Both are written by store/files.py `write_dir_atomic` (complete or absent; an existing non-empty output is refused
unless overwrite). `hf_gptq_layout` builds the GPTQ directory in memory and raises before anything is written, so
a caller writing both layouts validates the GPTQ export first.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ascend_llm.config.model import ModelConfig
from ascend_llm.config.quant import QuantConfig
from ascend_llm.errors import CheckpointError, InteropError
from ascend_llm.interop.export import hf_directory_files, hf_text_files
from ascend_llm.interop.names import to_hf, to_hf_module
from ascend_llm.quant.pack import pack_int32, unpack_int4
from ascend_llm.quant.rtn import QuantizedWeight
from ascend_llm.store.files import write_dir_atomic


def _write(out_dir: Path, tensors: dict[str, np.ndarray], files: dict[str, bytes], overwrite: bool, field: str,
           protect: Iterable[Path]) -> Path:
    """model.safetensors (tensors) and files, through write_dir_atomic (see there for overwrite/field/protect)."""

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"))
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return write_dir_atomic(Path(out_dir), fill, overwrite=overwrite, field=field, protect=protect)


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def quant_section(cfg: QuantConfig, layers: list[str]) -> dict:
    """config.json's "quantization" section of our layout: the grid of `cfg` and the quantized cell paths."""
    return {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym,
            "act_order": cfg.act_order, "damp_percent": cfg.damp_percent, "layers": sorted(layers)}


def save_quantized(model, model_cfg: ModelConfig, cfg: QuantConfig, layers: list[str], out_dir: Path,
                   text_files: dict[str, bytes] | None = None, *, eos_token_ids: list[int] | None = None,
                   overwrite: bool = False, field: str = "--out", protect: Iterable[Path] = ()) -> Path:
    """Write a quantized model (after apply_quantization) in our layout; returns the directory. text_files: the
    source's tokenizer files, chat template and generation config (`ModelSource.text_files`), copied as they are;
    eos_token_ids (`ModelSource.eos_token_ids`) name the EOS in a generation_config.json when the source has
    none. overwrite, field, protect (the source model's path): store/files.py `write_dir_atomic`'s output rule;
    OutputError (naming `field`) for an existing non-empty out_dir without overwrite; nothing half-written."""
    tensors = {name: np.ascontiguousarray(p.asnumpy()) for name, p in model.parameters_and_names()}
    config = {"model": dataclasses.asdict(model_cfg), "quantization": quant_section(cfg, layers)}
    files = {"config.json": _json(config), **hf_text_files(text_files, eos_token_ids)}
    return _write(out_dir, tensors, files, overwrite, field, protect)


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
    from ascend_llm.interop.hf_files import HF_FIELDS, check_sizes

    check_sizes(model_cfg, {k: v.shape for k, v in tensors.items()}, None, str(directory / "config.json"),
                {k: f"model.{k}" for k in HF_FIELDS})  # before any model is built
    model = build_model(model_cfg)
    model.return_aux_loss = False  # inference: plain logits, also for MoE models
    cells = dict(model.cells_and_names())
    for path in section["layers"]:
        dense = cells.get(path)
        if dense is None:
            raise CheckpointError("config.json quantization.layers", path, "must name Dense cells of the model")
        out_f, in_f = math.prod(dense.weight.shape[:-1]), dense.weight.shape[-1]  # MoE experts: (E * out, in)
        qw = read_quantized_weight(tensors, path, section, out_f, in_f)
        layer = QuantLinear(qw, tensors.get(f"{path}.bias"))
        layer.stacked_2d = dense.weight.ndim == 3  # models/moe.py expert_weight_of
        replace_cell(model, path, layer)
    sync_parameter_names(model)
    for name, param in model.parameters_and_names():
        if name not in tensors:
            raise CheckpointError(f"model.safetensors[{name}]", "missing", "every model parameter must be saved")
        param.set_data(Tensor(tensors[name]))
    return model, model_cfg, section


def hf_gptq_tensors(qw: QuantizedWeight, checkpoint_format: str) -> dict[str, np.ndarray]:
    """qweight, qzeros, scales, g_idx of one layer in the AutoGPTQ layout (see the module docstring)."""
    zeros = qw.zeros.T.astype(np.int64)  # (G, out)
    if checkpoint_format == "gptq":
        zeros = (zeros - 1) & (2 ** qw.bits - 1)
    return {"qweight": pack_int32(qw.codes.T, qw.bits, 0), "qzeros": pack_int32(zeros, qw.bits, 1),
            "scales": np.ascontiguousarray(qw.scales.T.astype(np.float16)),
            "g_idx": qw.group_of_column().astype(np.int32)}


@dataclass
class HFGPTQLayout:
    """A Hugging Face GPTQ directory held in memory: tensors by HF name (model.safetensors) and the other files
    (config.json, quantize_config.json, the text files) by file name."""

    tensors: dict[str, np.ndarray]
    files: dict[str, bytes]


def _check_packable(path: str, qw: QuantizedWeight) -> None:
    per = 32 // qw.bits
    out_f, in_f = qw.shape
    for axis, size in (("in_features", in_f), ("out_features", out_f)):
        if size % per:
            raise InteropError(f"--hf-gptq:{path}.{axis}", size,
                               f"the GPTQ layout packs {per} int{qw.bits} codes per int32: must be a multiple of {per}")


def _gptq_tensors(model, qweights: dict[str, QuantizedWeight], fmt: str) -> dict[str, np.ndarray]:
    """HF-named tensors: the packed quantized layers (and their biases) and every other parameter in float16."""
    tensors = {}
    for name, param in model.parameters_and_names():
        cell, leaf = name.rsplit(".", 1)
        if cell in qweights and leaf != "bias":
            continue  # written from the QuantizedWeight below
        hf = to_hf(name)  # a quantized layer's bias keeps its Dense name (`...wq.bias`)
        if hf is None:
            raise InteropError(f"--hf-gptq:{name}", list(param.shape), "has no tensor in the Hugging Face layout")
        tensors[hf] = param.asnumpy().astype(np.float16)
    for path, qw in qweights.items():
        module = to_hf_module(path)
        if module is None:
            raise InteropError(f"--hf-gptq:{path}", list(qw.shape), "has no module in the Hugging Face layout")
        _check_packable(path, qw)
        tensors.update({f"{module}.{key}": value for key, value in hf_gptq_tensors(qw, fmt).items()})
    return tensors


def hf_gptq_layout(model, model_cfg: ModelConfig, cfg: QuantConfig, qweights: dict[str, QuantizedWeight],
                   text_files: dict[str, bytes] | None = None, *,
                   eos_token_ids: list[int] | None = None) -> HFGPTQLayout:
    """The Hugging Face GPTQ directory of a quantized model (after apply_quantization; qweights: its
    {cell path: QuantizedWeight}), in memory. Unquantized tensors in float16. InteropError (naming the layer or
    config field) when the model has no HF family or a layer cannot be packed; nothing is written."""
    fmt = "gptq" if cfg.sym else "gptq_v2"
    qconfig = {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.act_order,
               "sym": cfg.sym, "damp_percent": cfg.damp_percent, "true_sequential": False,
               "static_groups": False, "checkpoint_format": fmt,
               "lm_head": "output" in qweights}  # GPTQModel's flag for a quantized lm_head
    files = hf_directory_files(model_cfg, "fp16", text_files, eos_token_ids, quantization=qconfig)
    files["quantize_config.json"] = _json(qconfig)
    return HFGPTQLayout(_gptq_tensors(model, qweights, fmt), files)


def write_hf_gptq(layout: HFGPTQLayout, out_dir: Path, *, overwrite: bool = False, field: str = "--hf-gptq",
                  protect: Iterable[Path] = ()) -> Path:
    """Write `layout` to out_dir through write_dir_atomic; OutputError (naming `field`) as there."""
    return _write(out_dir, layout.tensors, layout.files, overwrite, field, protect)


def export_hf_gptq(model, model_cfg: ModelConfig, cfg: QuantConfig, qweights: dict[str, QuantizedWeight],
                   out_dir: Path, text_files: dict[str, bytes] | None = None, *,
                   eos_token_ids: list[int] | None = None, overwrite: bool = False, field: str = "--hf-gptq",
                   protect: Iterable[Path] = ()) -> Path:
    """Write a Hugging Face GPTQ directory (model.safetensors, config.json of the source's family with
    quantization_config, quantize_config.json, the source's text files); `hf_gptq_layout` then `write_hf_gptq`."""
    layout = hf_gptq_layout(model, model_cfg, cfg, qweights, text_files, eos_token_ids=eos_token_ids)
    return write_hf_gptq(layout, out_dir, overwrite=overwrite, field=field, protect=protect)
