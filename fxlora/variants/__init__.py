"""LoRA variants: what an adapter's update is, beyond the layer it sits on.

Plain LoRA (`PLAIN`, the only variant today) adds ``scale * B(A(x))`` to the layer's output and
``scale * B @ A`` to its weight when merged. Variants such as DoRA change that; each declares what
of it still holds, and the code that relies on it asks the declared property instead of assuming
it:

- `LoraVariant.additive_update`: the output is ``base + scale * update(x)``, linear in the scale,
  the update independent of the base weights. The gate arithmetic of merged adapters relies on it
  (`branch_gate`: a branch adds ``wanted - merged`` times the update), and so do the fast paths
  that fuse or stack the updates (`fxlora.core.branch`, mixed batches).
- `LoraVariant.additive_delta`: merging adds a delta to the weight that is linear in the scale and
  depends on the adapter alone, so a merge is ``weight + delta`` and the exact unmerge of
  `fxlora.core.fold` (subtract, then restore the elements rounding missed) undoes it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from fxlora.errors import VariantError

__all__ = ["LoraVariant", "PLAIN", "register_variant", "variant_named", "variant_for", "branch_gate"]


@dataclass(frozen=True)
class LoraVariant:
    """One variant of the LoRA update and the properties fxlora's shortcuts rely on."""

    name: str
    additive_update: bool
    additive_delta: bool


_REGISTRY: dict[str, LoraVariant] = {}


def register_variant(variant: LoraVariant) -> LoraVariant:
    """Add `variant` (a name may be registered once); returns it."""
    if variant.name in _REGISTRY:
        raise ValueError(f"a LoRA variant named {variant.name!r} is already registered; registered: {list(_REGISTRY)}")
    _REGISTRY[variant.name] = variant
    return variant


def variant_named(name: str) -> LoraVariant:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no LoRA variant named {name!r}; registered: {list(_REGISTRY)}") from None


#: plain LoRA: ``base + scale * B(A(dropout(x)))``, merged as ``weight + scale * B @ A``
PLAIN = register_variant(LoraVariant("lora", additive_update=True, additive_delta=True))


def variant_for(config: Any) -> LoraVariant:
    """The variant a `fxlora.LoraConfig` asks for. Every config asks for plain LoRA today
    (`fxlora.io.peft_format` refuses adapter files with ``use_dora``)."""
    return PLAIN


Gate = TypeVar("Gate")


def branch_gate(variant: LoraVariant, wanted: Gate, merged: float) -> Gate:
    """What an adapter's branch must be multiplied by so that the layer computes its update at
    scale `wanted` (a number, or a tensor with one value per row), when `merged` times its update
    is already folded into the weights (0: not merged): ``wanted - merged``. Raises `VariantError`
    for a merged adapter whose variant is not additive (its branch cannot take the merge back)."""
    if not merged:
        return wanted
    if not variant.additive_update:
        raise VariantError(
            f"a merged adapter of the LoRA variant {variant.name!r} cannot be switched through its branch (its "
            "update is not additive); unmerge it first"
        )
    return wanted - merged
