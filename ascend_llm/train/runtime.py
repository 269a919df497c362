"""Selecting the device and execution mode, and applying the Ascend context knobs when on Ascend."""

from __future__ import annotations

import os

import mindspore as ms

from ascend_llm.config.runtime import ASCEND_910B_PEAK_TFLOPS, RuntimeConfig
from ascend_llm.config.threads import available_cpus, env_threads
from ascend_llm.errors import ConfigError


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


def cpu_threads(cfg: RuntimeConfig) -> int:
    """CPU kernel threads of this process: runtime.num_threads when > 0, else $OMP_NUM_THREADS (config/threads.py;
    the launcher sets cores // workers for workers sharing a node), else every core this process may run on.
    ConfigError names OMP_NUM_THREADS unless it is a positive integer."""
    return cfg.num_threads or env_threads() or available_cpus()


def set_cpu_threads(num_threads: int) -> None:
    """MindSpore's CPU kernel threads (its default, 25, oversubscribes small machines; see cpu_threads). Settable
    once per process."""
    if not _threads_set:
        ms.device_context.cpu.op_tuning.threads_num(num_threads)
        _threads_set.append(num_threads)


_device_set: list[str] = []


def setup_runtime(cfg: RuntimeConfig) -> str:
    """Set device, mode and threads; returns 'CPU' or 'Ascend'. The device is set once per process (after
    communication init MindSpore refuses to set it again): a later run in the same process keeps it, and
    ConfigError names runtime.device_target if it asks for another one."""
    device = resolve_device(cfg)
    if not _device_set:
        ms.set_device(device)
        _device_set.append(device)
    elif _device_set[0] != device:
        raise ConfigError("runtime.device_target", cfg.device_target,
                          f"this process already runs on {_device_set[0]} (the device is set once per process)")
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    if cfg.deterministic:
        ms.set_deterministic(True)
    if device == "CPU":
        set_cpu_threads(cpu_threads(cfg))
    else:
        ms.set_context(jit_config={"jit_level": cfg.jit_level}, max_device_memory=cfg.max_device_memory,
                       memory_optimize_level=cfg.memory_optimize_level,
                       ascend_config={"precision_mode": cfg.precision_mode})
    return device


def peak_tflops(cfg: RuntimeConfig, device: str) -> float:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    return ASCEND_910B_PEAK_TFLOPS if device == "Ascend" else cfg.cpu_peak_tflops
