"""Runtime schema (recipe group `runtime/`): device, execution mode, declared peak, Ascend context knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ascend_llm.config.checks import non_negative, one_of, positive

ASCEND_910B_PEAK_TFLOPS = 354.0  # bf16 dense TFLOP/s per 910B device: the figure verl and MindSpeed use (declared)


@dataclass
class RuntimeConfig:
    """Where and how the step runs.

    device_target: auto (Ascend when CANN and a device are present, else CPU) | cpu | ascend.
    mode: graph (ms.jit-compiled steps) | pynative (eager, for debugging).
    peak_tflops: declared peak TFLOP/s per device for MFU; None: 354 on Ascend 910B (bf16 dense, the figure
        verl and MindSpeed use) and cpu_peak_tflops on CPU (a nominal figure: set it for your machine).
    num_threads: CPU kernel threads (0: $OMP_NUM_THREADS if set, else every core this process may use; `launch`
        sets OMP_NUM_THREADS to cores // workers for several workers on a node).
    deterministic: MindSpore deterministic kernels.
    max_device_memory, jit_level, memory_optimize_level, precision_mode: Ascend context settings, applied only on
        Ascend. validate() checks jit_level and memory_optimize_level everywhere; max_device_memory ("58GB",
        "512MB") is parsed by the memory planner (`ascend-llm plan`, and the preflight with train.memory_check)
        when device_target=ascend; precision_mode is passed to MindSpore as is.
    """

    device_target: str = "auto"  # auto | cpu | ascend
    mode: str = "graph"  # graph | pynative
    # Declared peak for MFU, TFLOP/s per device. None: 354 on Ascend (the figure verl/MindSpeed use
    # for 910B), and on CPU a nominal figure the user should set for their machine.
    peak_tflops: Optional[float] = None
    cpu_peak_tflops: float = 0.1
    num_threads: int = 0  # 0: $OMP_NUM_THREADS, else all cores
    deterministic: bool = False
    # Applied only when the device is Ascend (see the class docstring for which are checked where).
    max_device_memory: str = "58GB"
    jit_level: str = "O1"
    memory_optimize_level: str = "O0"
    precision_mode: str = "must_keep_origin_dtype"

    def validate(self, prefix: str = "runtime") -> None:
        """Raises ConfigError naming the field: unknown device_target, mode, jit_level or memory_optimize_level, a peak
        (TFLOP/s) <= 0, or num_threads < 0."""
        one_of(f"{prefix}.device_target", self.device_target, ("auto", "cpu", "ascend"))
        one_of(f"{prefix}.mode", self.mode, ("graph", "pynative"))
        if self.peak_tflops is not None:
            positive(f"{prefix}.peak_tflops", self.peak_tflops)
        positive(f"{prefix}.cpu_peak_tflops", self.cpu_peak_tflops)
        non_negative(f"{prefix}.num_threads", self.num_threads)
        one_of(f"{prefix}.jit_level", self.jit_level, ("O0", "O1", "O2"))
        one_of(f"{prefix}.memory_optimize_level", self.memory_optimize_level, ("O0", "O1"))
