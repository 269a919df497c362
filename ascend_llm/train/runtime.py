"""Selecting the device and execution mode, and applying the Ascend context knobs when on Ascend."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mindspore as ms

from ascend_llm.config.runtime import RuntimeConfig
from ascend_llm.errors import ConfigError

ASCEND_910B_PEAK_TFLOPS = 354.0  # bf16 dense; the figure verl and MindSpeed hard-code for 910B


def resolve_device(cfg: RuntimeConfig) -> str:
    if cfg.device_target == "cpu":
        return "CPU"
    # Ask MindSpore only where CANN is installed: elsewhere the probe prints a library-load failure.
    has_cann = bool(os.environ.get("ASCEND_HOME_PATH")) or os.path.isdir("/usr/local/Ascend")
    ascend = has_cann and ms.hal.is_available("Ascend")
    if cfg.device_target == "ascend" and not ascend:
        raise ConfigError("runtime.device_target", "ascend", "no Ascend device/CANN here; use auto or cpu")
    return "Ascend" if ascend else "CPU"


_threads_set: list[int] = []


def set_cpu_threads(num_threads: int) -> None:
    """Kernel threads = cores (MindSpore defaults to 25, oversubscribing small machines). Settable once."""
    if not _threads_set:
        ms.device_context.cpu.op_tuning.threads_num(num_threads)
        _threads_set.append(num_threads)


def setup_runtime(cfg: RuntimeConfig) -> str:
    """Set device, mode and threads; returns 'CPU' or 'Ascend'."""
    device = resolve_device(cfg)
    ms.set_device(device)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    if cfg.deterministic:
        ms.set_deterministic(True)
    if device == "CPU":
        set_cpu_threads(cfg.num_threads or os.cpu_count() or 1)
    else:
        ms.set_context(jit_config={"jit_level": cfg.jit_level}, max_device_memory=cfg.max_device_memory,
                       memory_optimize_level=cfg.memory_optimize_level,
                       ascend_config={"precision_mode": cfg.precision_mode})
    return device


# Recipe fields that change no compiled graph: a rerun that differs only in these reuses the cache.
_NOT_IN_GRAPHS = {"train": ("output_dir", "resume", "overwrite", "progress", "num_steps", "log_every", "val_every",
                            "ckpt_every", "keep_last", "sample_prompt"),
                  "runtime": ("compile_cache", "compile_cache_dir"), "cluster": ("log_dir",)}


def compile_cache_key(recipe: dict) -> str:
    """sha256 (hex, 16 chars) of what the compiled graphs depend on: the resolved recipe (a plain dict) without
    the fields in _NOT_IN_GRAPHS, every source file of the ascend_llm package, and the MindSpore version.
    MindSpore's own cache checks only its inputs' structure, so a changed shape or dtype in the recipe, or a
    changed model file, must land in another directory."""
    digest = hashlib.sha256(ms.__version__.encode())
    kept = {group: {k: v for k, v in fields.items() if k not in _NOT_IN_GRAPHS.get(group, ())}
            if isinstance(fields, dict) else fields for group, fields in recipe.items()}
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


_cache_set: list[Path] = []


def enable_compile_cache(cfg: RuntimeConfig, recipe: dict) -> Path | None:
    """With cfg.compile_cache, point MindSpore's compile cache at compile_cache_dir/<compile_cache_key> (rank
    subdirectories are MindSpore's) before the first graph compiles; returns that directory, else None."""
    if not cfg.compile_cache:
        if _cache_set:  # a run earlier in this process enabled it: not for this one
            for name in ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"):
                os.environ.pop(name, None)
            _cache_set.clear()
        return None
    path = Path(cfg.compile_cache_dir).expanduser() / compile_cache_key(recipe)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = str(path)
    _cache_set.append(path)
    return path


def peak_tflops(cfg: RuntimeConfig, device: str) -> float:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    return ASCEND_910B_PEAK_TFLOPS if device == "Ascend" else cfg.cpu_peak_tflops
