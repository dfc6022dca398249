"""LoRA variants: what an adapter's update is, beyond the layer it sits on.

Plain LoRA (`PLAIN`) adds ``scale * B(A(x))`` to the layer's output and ``scale * B @ A`` to its
weight when merged. DoRA (`DORA`, ``LoraConfig(use_dora=True)``, `fxlora.variants.dora`) changes
that; each variant declares what of it still holds, and the code that relies on it asks the
declared property instead of assuming it:

- `LoraVariant.additive_update`: the output is ``base + scale * update(x)``, linear in the scale,
  the update independent of the base weights. The gate arithmetic of merged adapters relies on it
  (`branch_gate`: a branch adds ``wanted - merged`` times the update), and so do the fast paths
  that fuse or stack the updates (`fxlora.core.branch`, mixed batches).
- `LoraVariant.additive_delta`: merging adds a delta to the weight that is linear in the scale and
  depends on the adapter alone, so a merge is ``weight + delta`` and the exact unmerge of
  `fxlora.core.fold` (subtract, then restore the elements rounding missed) undoes it bit for bit.
- `LoraVariant.magnitude`: the adapter has a magnitude vector (DoRA).
"""

from __future__ import annotations

from typing import Any, TypeVar

from fxlora.errors import VariantError
from fxlora.variants.base import PLAIN, LoraVariant, register_variant, variant_named
from fxlora.variants.dora import DORA

__all__ = ["LoraVariant", "PLAIN", "DORA", "register_variant", "variant_named", "variant_for", "branch_gate"]


def variant_for(config: Any) -> LoraVariant:
    """The variant a `fxlora.LoraConfig` asks for: `DORA` with ``use_dora=True``, else `PLAIN`."""
    return DORA if getattr(config, "use_dora", False) else PLAIN


Gate = TypeVar("Gate")


def branch_gate(variant: LoraVariant, wanted: Gate, merged: float) -> Gate:
    """What an adapter's branch must be multiplied by so that the layer computes its update at
    scale `wanted` (a number, or a tensor with one value per row), when `merged` times its update
    is already folded into the weights (0: not merged): ``wanted - merged``. A merged adapter
    whose variant is not additive computes through its merged weights alone: its branch gate is
    0 where `wanted` (a number) is the merged scale, and any other `wanted` raises `VariantError`
    (its branch cannot take the merge back)."""
    if not merged:
        return wanted
    if not variant.additive_update:
        if isinstance(wanted, (int, float)) and wanted == merged:
            return 0.0
        raise VariantError(
            f"a merged adapter of the LoRA variant {variant.name!r} cannot be switched through its branch (its "
            f"update is not additive: it is merged at scale {merged} and would be wanted at {wanted}); unmerge "
            "it first"
        )
    return wanted - merged
