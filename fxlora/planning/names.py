"""PEFT's rules for module names in a config, in one place."""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["matches_name_list", "is_under"]


def matches_name_list(names: Sequence[str], key: str) -> bool:
    """PEFT's list rule: `key` equals an entry or ends with ``"." + entry``."""
    return any(key == n or key.endswith("." + n) for n in names)


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    """`name` is one of `prefixes` or inside one (``prefix + "."`` starts it): PEFT's
    ``modules_to_save`` rule."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
