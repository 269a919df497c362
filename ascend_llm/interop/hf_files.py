"""Reading a Hugging Face model directory (Llama, Qwen2, Qwen3), the pieces of the opener (interop/source.py
`open_model`) and of `hf.load`: config.json, the safetensors files (single or sharded by
`model.safetensors.index.json`), size checks against the weights' headers, toolkit-named float32 weights
(bf16/fp16 upcast exactly) and their assignment into a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from mindspore import Tensor, nn

from ascend_llm.config.model import ModelConfig
from ascend_llm.errors import InteropError
from ascend_llm.interop.hf_config import MAX_POSITIONS
from ascend_llm.interop.names import from_hf, to_hf
from ascend_llm.interop.safetensors_io import read_header, read_tensors
from ascend_llm.store.files import is_plain_relative
from ascend_llm.tokenizer.hf import parse_json_object

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


MAX_JSON_BYTES = 64 << 20  # config.json, generation_config.json, the index: a few KB in real models


def _read_json_object(file: Path) -> dict:
    """A JSON object from `file` (at most MAX_JSON_BYTES); InteropError naming the file otherwise."""
    try:
        if file.stat().st_size > MAX_JSON_BYTES:
            raise InteropError(str(file), f"{file.stat().st_size} bytes", f"must be at most {MAX_JSON_BYTES} bytes")
        data = file.read_bytes()
    except OSError as exc:
        raise InteropError(str(file), "unreadable", exc.strerror or str(exc)) from None
    return parse_json_object(data, str(file))


def read_config(root: Path) -> dict:
    """config.json of a model directory as a dict; InteropError when missing, not JSON or not an object."""
    file = Path(root) / "config.json"
    if not file.is_file():
        raise InteropError(str(file), "missing", "a Hugging Face model directory holds config.json")
    return _read_json_object(file)


def inside(root: Path, name: object, field: str) -> Path:
    """root/name for a file name read from a file in root (an index, state.json): a plain relative path that
    stays inside root. InteropError naming `field` for `../x`, absolute paths, empty or non-string names."""
    if not is_plain_relative(name):
        raise InteropError(field, name, "must name a file inside the model directory (no '..', not absolute)")
    return Path(root) / name


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards named by the index, or model.safetensors.
    InteropError for an index that is not JSON, has no weight_map object, or names a file outside the directory."""
    root = Path(root)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InteropError(f"{index}:weight_map", type(weight_map).__name__, "must be an object "
                               "{tensor name: file name}")
        files = [inside(root, name, f"{index}:weight_map[{key!r}]") for key, name in weight_map.items()]
        files = sorted(set(files))
    else:
        files = [root / "model.safetensors"]
    for file in files:
        if not file.is_file():
            hint = " (PyTorch .bin weights are not read: convert them to safetensors)" \
                if (root / "pytorch_model.bin").exists() else ""
            raise InteropError(str(file), "missing", "listed weights must exist" + hint)
    return files


# ModelConfig field -> the key that names it in a Hugging Face config.json
HF_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "ffn_hidden_dim": "intermediate_size",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
             "num_layers": "num_hidden_layers", "max_seq_len": "max_position_embeddings"}


def _layer_count(names: list[str]) -> int:
    layers = [int(n.split(".")[1]) for n in names if n.startswith("layers.") and n.split(".")[1].isdigit()]
    return max(layers) + 1 if layers else 0


def check_sizes(cfg: ModelConfig, shapes: Mapping[str, Sequence[int]], held: int | None, where: str,
                fields: Mapping[str, str] = HF_FIELDS) -> None:
    """Refuse a config whose sizes the weights do not hold, before any model is built (a config asking for 10^7
    layers or a vocabulary of 10^12 would otherwise be allocated). shapes: {toolkit parameter name: shape} of
    the tensors at hand; held: how many values they hold in all (None: not compared, e.g. packed codes); where:
    the file the config came from; fields: how `where` names each ModelConfig field. Compares vocab_size/dim
    with the embedding, ffn_hidden_dim with layer 0's w1, num_heads/num_kv_heads (times head_dim) with layer 0's
    wq/wk, num_layers with the layers present, count_params(cfg) with `held`, and max_seq_len with MAX_POSITIONS
    (RoPE tables are (max_seq_len, head_dim) arrays). InteropError naming `where` and the field."""
    from ascend_llm.models.llama import count_params

    if cfg.max_seq_len > MAX_POSITIONS:
        raise InteropError(f"{where}:{fields['max_seq_len']}", cfg.max_seq_len, f"must be at most {MAX_POSITIONS}")

    layer0 = "layers.0."
    checks = [("vocab_size", cfg.vocab_size, "tok_embeddings.weight", 0),
              ("dim", cfg.dim, "tok_embeddings.weight", 1),
              ("ffn_hidden_dim", cfg.ffn_hidden_dim, layer0 + "feed_forward.w1.weight", 0),
              ("num_heads", cfg.num_heads * cfg.head_dim, layer0 + "attention.wq.weight", 0),
              ("num_kv_heads", cfg.num_kv_heads * cfg.head_dim, layer0 + "attention.wk.weight", 0)]
    for field_name, want, tensor, axis in checks:
        shape = shapes.get(tensor)
        if shape is not None and (len(shape) <= axis or shape[axis] != want):
            per_head = f" (x head_dim {cfg.head_dim} = {want})" if field_name.startswith("num_") else ""
            raise InteropError(f"{where}:{fields[field_name]}", getattr(cfg, field_name),
                               f"does not match the weights{per_head}: {to_hf(tensor) or tensor} has shape "
                               f"{list(shape)}")
    num_layers = _layer_count(list(shapes))
    if shapes and cfg.num_layers != num_layers:
        raise InteropError(f"{where}:{fields['num_layers']}", cfg.num_layers, f"the weights hold {num_layers} layers")
    need = count_params(cfg)
    if held is not None and need > held:
        raise InteropError(where, f"{need:,} parameters", f"the weights hold {held:,} values: the sizes it "
                           "declares do not match the weights")


def check_config_fits(cfg: ModelConfig, root: Path) -> None:
    """check_sizes for a Hugging Face directory, reading only the weight files' headers. InteropError names
    config.json and its key (vocab_size, hidden_size, num_hidden_layers, intermediate_size,
    num_attention_heads, num_key_value_heads), or the weight file that is malformed."""
    shapes: dict[str, list[int]] = {}
    held = 0
    for file in weight_files(root):
        for hf_name, spec in read_header(file).items():
            held += math.prod(spec["shape"])
            name = from_hf(hf_name)
            if name is not None:
                shapes[name] = spec["shape"]
    check_sizes(cfg, shapes, held, str(Path(root) / "config.json"))


def read_hf_weights(root: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Toolkit-named float32 weights from the directory; InteropError names an unknown or missing tensor, a size
    in config.json the weights do not hold (check_config_fits, before any tensor is read), or a malformed file."""
    from ascend_llm.interop.hf_moe import is_expert_tensor, stack_experts

    check_config_fits(cfg, root)
    weights, experts = {}, {}
    for file in weight_files(root):
        for hf_name, array in read_tensors(file).items():
            name = from_hf(hf_name)
            if name is None and cfg.num_experts and is_expert_tensor(hf_name):
                experts[hf_name] = array
                continue
            if name is None:
                if hf_name.endswith(IGNORED_SUFFIXES):
                    continue
                raise InteropError(f"{file.name}:{hf_name}", list(array.shape),
                                   "tensor not in the Llama/Qwen2/Qwen3 layout this toolkit computes")
            if name == "output.weight" and cfg.tie_embeddings:
                continue
            weights[name] = array.astype(np.float32, copy=False)
    if cfg.num_experts:  # stacked (E, ...) expert weights from either layout, every expert checked
        weights.update(stack_experts(experts, cfg, str(root)))
    return weights




def assign_weights(model: nn.Cell, weights: dict[str, np.ndarray], source: str = "weights") -> None:
    """Copy named arrays into the model's parameters; every parameter must be given, with its exact shape."""
    params = {p.name: p for p in model.get_parameters()}
    missing = sorted(set(params) - set(weights))
    if missing:
        raise InteropError(f"{source}:{missing[0]}", "missing", f"{len(missing)} model tensor(s) absent")
    extra = sorted(set(weights) - set(params))
    if extra:
        raise InteropError(f"{source}:{extra[0]}", "unexpected", "not a parameter of the configured model")
    for name, param in params.items():
        value = weights[name]
        if tuple(value.shape) != tuple(param.shape):
            raise InteropError(f"{source}:{name}", list(value.shape), f"shape must be {list(param.shape)}")
        param.set_data(Tensor(value, param.dtype))
