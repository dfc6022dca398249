"""The `LoraVariant` record and the registry of variants (see `fxlora.variants`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LoraVariant", "PLAIN", "register_variant", "variant_named"]


@dataclass(frozen=True)
class LoraVariant:
    """One variant of the LoRA update and the properties fxlora's shortcuts rely on.

    ``magnitude``: the adapter carries a learned magnitude per output feature
    (``lora_magnitude_vector``) and computes DoRA's update (`fxlora.variants.dora`)."""

    name: str
    additive_update: bool
    additive_delta: bool
    magnitude: bool = False


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
