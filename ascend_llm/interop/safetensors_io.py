"""Safetensors files with bf16/fp16/fp32 tensors, read and written with NumPy alone.

`safetensors.numpy` has no bfloat16 (NumPy has none), so bf16 is handled here as raw uint16 bits: reading
upcasts exactly (bits << 16 is the float32 with the same value); writing rounds float32 to nearest-even bf16
(the rounding of `ml_dtypes.bfloat16` and torch's `.to(torch.bfloat16)`). File layout (the safetensors spec,
https://github.com/huggingface/safetensors#format): 8-byte little-endian header size N, N bytes of JSON
{name: {dtype, shape, data_offsets}} (+ optional __metadata__), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from ascend_llm.errors import InteropError
from ascend_llm.store.files import write_file_atomic

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
EXPORT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library itself (safetensors/src/tensor.rs)


def _bad(path: Path, field: str, value: object, allowed: str) -> InteropError:
    return InteropError(f"{path}:{field}", value, allowed)


def _check_spec(path: Path, name: str, spec: object, data_len: int) -> tuple[int, int]:
    """(begin, end) of one header entry after checking dtype, shape and offsets against the data's length."""
    if not isinstance(spec, dict):
        raise _bad(path, name, type(spec).__name__, "must be an object with dtype, shape, data_offsets")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in _NUMPY:
        raise _bad(path, f"{name}.dtype", dtype, "allowed: " + ", ".join(_NUMPY))
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, f"{name}.shape", shape, "must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _bad(path, f"{name}.data_offsets", offsets, "must be [begin, end] with 0 <= begin <= end")
    if offsets[1] > data_len:
        raise _bad(path, f"{name}.data_offsets", offsets, f"past the end of the data ({data_len} bytes)")
    need = math.prod(shape) * np.dtype(_NUMPY[dtype]).itemsize
    if offsets[1] - offsets[0] != need:
        raise _bad(path, f"{name}.data_offsets", offsets, f"span {offsets[1] - offsets[0]} bytes; shape {shape} "
                   f"of {dtype} needs {need}")
    return offsets[0], offsets[1]


def _read_layout(path: Path) -> tuple[dict[str, dict], int]:
    """(header without __metadata__, offset of the data) after checking the header against the file's size: its
    length field, JSON, every entry's dtype/shape/offsets, offsets inside the data and no two tensors overlapping.
    Reads only the header (at most MAX_HEADER_BYTES, never more than the file holds)."""
    try:
        size_on_disk = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise _bad(path, "header size", size_on_disk, "a safetensors file starts with an 8-byte header size")
            (size,) = struct.unpack("<Q", head)
            if size > min(size_on_disk - 8, MAX_HEADER_BYTES):
                raise _bad(path, "header size", size, f"must fit in the file ({size_on_disk} bytes) and be at most "
                           f"{MAX_HEADER_BYTES}: not a safetensors file, or a truncated one")
            text = handle.read(size)
    except OSError as exc:
        raise InteropError(str(path), "unreadable", f"must be a readable safetensors file ({exc.strerror})") from None
    try:
        header = json.loads(text)
    except ValueError as exc:  # also UnicodeDecodeError
        raise _bad(path, "header", "not JSON", f"must be the safetensors JSON header ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header", type(header).__name__, "must be a JSON object {name: {dtype, shape, "
                   "data_offsets}}")
    header.pop("__metadata__", None)
    data_len = size_on_disk - 8 - size
    spans = sorted((_check_spec(path, name, spec, data_len), name) for name, spec in header.items())
    last, last_name = (0, 0), None  # the non-empty span that ends last so far
    for span, name in spans:
        if span[0] < span[1]:
            if span[0] < last[1]:
                raise _bad(path, f"{name}.data_offsets", list(span), f"overlaps {last_name} {list(last)}")
            last, last_name = span, name
    return header, 8 + size


def read_header(path: Path) -> dict[str, dict]:
    """{name: {"dtype": "BF16"|..., "shape": [...], "data_offsets": [begin, end]}} without reading tensor data.
    InteropError naming the file and the field (header size, header, <tensor>.dtype/.shape/.data_offsets) for a
    file that is not a well-formed safetensors file."""
    return _read_layout(Path(path))[0]


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one file; floats come back as float32 (bf16/fp16 upcast exactly), others as stored.
    The header is checked first (read_header), so nothing larger than the file is ever allocated."""
    path = Path(path)
    header, start = _read_layout(path)
    if os.path.getsize(path) == start:
        raw = np.empty(0, np.uint8)
    else:
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    out = {}
    for name, spec in header.items():
        dtype = spec["dtype"]
        begin, end = spec["data_offsets"]
        array = np.frombuffer(raw[begin:end], dtype=_NUMPY[dtype]).reshape(spec["shape"])
        out[name] = to_float32(array, dtype) if dtype in ("BF16", "F16") else np.array(array)
    return out


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Exact upcast of stored F16 values or BF16 bits (uint16) to float32."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest, ties to even; NaN stays NaN."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    return np.where(nan, ((bits >> 16) | 0x0040).astype(np.uint16), rounded)


def encode(array: np.ndarray, dtype: str) -> bytes:
    """Raw little-endian bytes of a float array stored as `dtype` (BF16, F16 or F32)."""
    if dtype == "BF16":
        return bf16_bits(array).tobytes()
    return np.ascontiguousarray(array, dtype=np.float16 if dtype == "F16" else np.float32).tobytes()


def write_tensors(path: Path, tensors: dict[str, np.ndarray], dtype: str, metadata: dict | None = None) -> None:
    """Write float tensors as one safetensors file of `dtype` (BF16/F16/F32), atomically
    (store/files.write_file_atomic). Tensors are laid out in the dict's order; the header is padded with spaces to
    8 bytes (the spec). OutputError when the file cannot be written."""
    path = Path(path)
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, value in tensors.items():
        blob = encode(value, dtype)
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    write_file_atomic(path, [struct.pack("<Q", len(text)), text, *blobs])
