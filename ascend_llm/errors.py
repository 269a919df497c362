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
        return f"{self.area} error: " + " ".join(str(self).split())


class ConfigError(UserInputError):
    area = "config"


class DataError(UserInputError):
    area = "data"


class CheckpointError(UserInputError):
    area = "checkpoint"


class RankTableError(UserInputError):
    area = "rank table"


class LaunchError(UserInputError):
    area = "launch"


class InteropError(UserInputError):
    """A model directory (Hugging Face config.json, weights, tokenizer) that cannot be read or is unsupported."""

    area = "model import"
