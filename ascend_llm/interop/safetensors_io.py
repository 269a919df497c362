"""Safetensors files with bf16/fp16/fp32 tensors, read and written with NumPy alone.

`safetensors.numpy` has no bfloat16 (NumPy has none), so bf16 is handled here as raw uint16 bits: reading
upcasts exactly (bits << 16 is the float32 with the same value); writing rounds float32 to nearest-even bf16
(the rounding of `ml_dtypes.bfloat16` and torch's `.to(torch.bfloat16)`). File layout (the safetensors spec,
https://github.com/huggingface/safetensors#format): 8-byte little-endian header size N, N bytes of JSON
{name: {dtype, shape, data_offsets}} (+ optional __metadata__), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from ascend_llm.errors import InteropError

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
EXPORT_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def read_header(path: Path) -> dict[str, dict]:
    """{name: {"dtype": "BF16"|..., "shape": [...], "data_offsets": [begin, end]}} without reading tensor data."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise InteropError(str(path), "unreadable", f"must be a safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one file; floats come back as float32 (bf16/fp16 upcast exactly), others as stored."""
    path = Path(path)
    header = read_header(path)
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, spec in header.items():
        dtype = spec["dtype"]
        if dtype not in _NUMPY:
            raise InteropError(f"{path}:{name}.dtype", dtype, "allowed: " + ", ".join(_NUMPY))
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
    """Write float tensors as one safetensors file of `dtype` (BF16/F16/F32), atomically (temp file, fsync,
    rename). Tensors are laid out in the dict's order; the header is padded with spaces to 8 bytes (the spec)."""
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)))
            handle.write(text)
            for blob in blobs:
                handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
