"""Checks of single `LoraConfig` values (`fxlora.config`): each raises `ValueError` / `TypeError`
naming the field, the value and what would be valid."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["ALL_LINEAR", "normalise_names", "check_rank", "check_alpha", "check_bool_field", "check_regex"]

ALL_LINEAR = "all-linear"


def normalise_names(name: str, value: Any, *, allow_str: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if allow_str:
            if not value:
                raise ValueError(f"{name} must not be an empty string")
            return value
        value = [value]  # a single module name, the obvious intent
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, (list, tuple)):
        kinds = "a str (regex), a list of names or None" if allow_str else "a list of names or None"
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}: {value!r}")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{name} entries must be non-empty str, got {item!r} in {value!r}")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"{name} is an empty list; give at least one module name or use None")
    return out


def check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (r >= 1), got {value!r}")


def check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def check_bool_field(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_regex(name: str, value: Any) -> None:
    if isinstance(value, str) and value.lower() != ALL_LINEAR:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(
                f"{name}={value!r} is not a valid regular expression ({exc}); a str is matched with "
                "re.fullmatch against each module name, a list holds literal names"
            ) from None
