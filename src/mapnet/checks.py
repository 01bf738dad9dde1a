"""Argument checks shared by the configs and modules: one message per kind of mistake.

Public: `from_dict` builds any dataclass from a JSON object, naming unknown keys (the
experiments' configs use it as MappingConfig.from_dict does); `positive_int` checks a count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["from_dict", "positive_int"]

T = TypeVar("T")


def positive_int(name: str, value: object) -> int:
    """`value` if it is an int (not a bool) above 0, else a TypeError or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass `cls` from `data`, naming any unknown keys instead of a TypeError."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} is built from a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**data)
