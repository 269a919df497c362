"""One error type per area. Each message names the field (or JSON path), the bad value and what is allowed.

The CLI prints these in one line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Base for mistakes in user input (config, corpus, rank table, checkpoint)."""

    area = "input"

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r}: {allowed}")

    def one_line(self) -> str:
        """`<area> error: <field>=<value>: <allowed>` with all whitespace collapsed: what the CLI prints."""
        return f"{self.area} error: " + " ".join(str(self).split())


class ConfigError(UserInputError):
    """A recipe field or command-line override (names the dotted field, e.g. `optim.lr`)."""

    area = "config"


class DataError(UserInputError):
    """A corpus, tokenizer or prepared-data problem (names the file, line or `data.*` field)."""

    area = "data"


class CheckpointError(UserInputError):
    """A checkpoint that is missing, corrupt or does not match the recipe (names the file or key)."""

    area = "checkpoint"


class RankTableError(UserInputError):
    """An HCCL rank table, or the devices and IPs one is generated from, that cannot be read or breaks a rule
    (names the JSON path, the file or the option)."""

    area = "rank table"


class LaunchError(UserInputError):
    """A launch that cannot start or whose environment disagrees with the recipe (names the setting or variable)."""

    area = "launch"


class InteropError(UserInputError):
    """A model directory (Hugging Face config.json, weights, tokenizer) that cannot be read or is unsupported."""

    area = "model import"


class OutputError(UserInputError):
    """An output path that cannot be written (read-only, full disk, a file where a directory belongs) or that
    the toolkit refuses to replace (not empty, not written by it, the working directory, the source model)."""

    area = "output"


class TrainingDiverged(RuntimeError):
    """Raised by the trainer after `train.max_nonfinite_steps` non-finite steps in a row (exit status 3)."""

    def __init__(self, step: int, loss: float, grad_norm: float, num_steps: int, likely: str):
        self.step, self.loss, self.grad_norm, self.num_steps, self.likely = step, loss, grad_norm, num_steps, likely
        super().__init__(f"training diverged at step {step}: {num_steps} non-finite steps in a row (loss={loss:g}, "
                         f"grad_norm={grad_norm:g}); likely field: {likely}; the newest checkpoint holds the last "
                         "finite weights (resume from it with the field changed, or train.max_nonfinite_steps)")

    def one_line(self) -> str:
        """`error: training diverged at step ...` in one line, for the CLI."""
        return "error: " + " ".join(str(self).split())
