"""Merging adapters into the base weights, unmerging, unloading and exporting merged weights.

Mixin of `fxlora.LoraModel` (the merge/export issue builds it out).
"""

from __future__ import annotations

__all__ = ["MergeMixin"]


class MergeMixin:
    pass
