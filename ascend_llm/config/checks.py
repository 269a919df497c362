"""Small validators shared by the config schemas; each raises ConfigError naming the field."""

from __future__ import annotations

from collections.abc import Iterable

from ascend_llm.errors import ConfigError


def positive(field: str, value: float) -> None:
    """Raises ConfigError(field, value, "must be > 0") when `value` is None or <= 0."""
    if value is None or value <= 0:
        raise ConfigError(field, value, "must be > 0")


def non_negative(field: str, value: float) -> None:
    """Raises ConfigError(field, value, "must be >= 0") when `value` is None or < 0."""
    if value is None or value < 0:
        raise ConfigError(field, value, "must be >= 0")


def in_range(field: str, value: float, low: float, high: float) -> None:
    """Raises ConfigError naming `field` unless low <= value <= high (both ends included; None fails)."""
    if value is None or not (low <= value <= high):
        raise ConfigError(field, value, f"must be in [{low}, {high}]")


def one_of(field: str, value: object, allowed: Iterable[object]) -> None:
    """Raises ConfigError listing the allowed values when `value` is not among `allowed` (compared with ==)."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(field, value, "allowed: " + ", ".join(map(str, allowed)))
