"""Checks for the numeric fields of settings dataclasses, with errors that name the field."""

from __future__ import annotations

import math
from dataclasses import Field, field, fields
from typing import Any

from fedprompt.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_ints(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def non_negative_ints(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not _is_int(value) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")


def finite_numbers(obj: Any, *names: str, positive: bool) -> None:
    """Each field is a finite number, > 0 when ``positive``, else >= 0."""
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (positive and value == 0):
            kind = "positive" if positive else "non-negative"
            raise ConfigError(f"{name} must be a {kind} finite number, got {value!r}")


def setting(default: Any, *, flag: str = "") -> Any:
    """A field of a settings dataclass; ``flag``: the help text of the command-line flag of its own that the
    setting gets (``fedprompt server --num-rounds``); every setting without one is still set with ``--set``."""
    return field(default=default, metadata={"flag": flag} if flag else {})


def flagged(cls: type) -> list[Field]:
    """The fields of settings dataclass ``cls`` that have a flag of their own."""
    return [f for f in fields(cls) if f.metadata.get("flag")]
