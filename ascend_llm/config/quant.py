"""Weight-only post-training quantization settings (`ascend-llm quantize`): a plain dataclass, no file access."""

from __future__ import annotations

from dataclasses import dataclass, field

from ascend_llm.config.checks import in_range, one_of, positive
from ascend_llm.errors import ConfigError


@dataclass
class QuantConfig:
    """What to quantize and how.

    bits: 8 (int8) or 4 (int4, stored two codes per byte).
    group_size: input columns sharing one scale/zero; -1 = one group per output channel (per-channel).
        A size that does not divide in_features leaves a shorter last group (GPTQ's g_idx = col // group_size).
    sym: symmetric (zero point fixed at 2**(bits-1), scale = amax / (2**(bits-1) - 1)) or asymmetric
        (scale = (max(w, 0) - min(w, 0)) / (2**bits - 1), zero = round(-min(w, 0) / scale)).
    method: "rtn" (round to nearest) or "gptq" (Frantar et al. 2023, arXiv:2210.17323).
    include: cell-path patterns (fnmatch, on the leaf name or the full path) of Dense cells to quantize.
    include_output: also quantize the output head `output`.
    damp_percent, block_size, act_order: GPTQ's Hessian damping (fraction of mean diag(H)), lazy-update
        block width and column order (descending diag(H)).
    num_calib_samples, calib_seq_len, calib_seed: GPTQ calibration windows drawn from a corpus.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    method: str = "rtn"
    include: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    include_output: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    num_calib_samples: int = 64
    calib_seq_len: int = 256
    calib_seed: int = 0

    def validate(self, prefix: str = "quant") -> None:
        """Raises ConfigError naming the field: bits not 4/8, method not rtn/gptq, group_size not -1 or an integer >= 2,
        damp_percent outside [0, 1], block_size or calibration sizes <= 0, or nothing to quantize."""
        one_of(f"{prefix}.bits", self.bits, (4, 8))
        one_of(f"{prefix}.method", self.method, ("rtn", "gptq"))
        one_of(f"{prefix}.sym", self.sym, (True, False))
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise ConfigError(f"{prefix}.group_size", self.group_size, "must be -1 (per channel) or an integer >= 2")
        in_range(f"{prefix}.damp_percent", self.damp_percent, 0.0, 1.0)
        for name in ("block_size", "num_calib_samples", "calib_seq_len"):
            positive(f"{prefix}.{name}", getattr(self, name))
        if not self.include and not self.include_output:
            raise ConfigError(f"{prefix}.include", self.include, "name at least one layer pattern (e.g. wq)")
