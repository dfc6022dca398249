"""DoRA (weight-decomposed LoRA, ``LoraConfig(use_dora=True)``): the variant and its formulas.

An adapted weight is split into a direction and a learned magnitude ``m``, one per output feature
(``lora_magnitude_vector.<adapter>.weight``, PEFT's name): the layer computes with
``W' = m * (W + s * B @ A) / ||W + s * B @ A||``, the norm taken per output feature ("column
norm" in the paper) and treated as a constant (detached: no gradient flows through it, as the
paper's section 4.3 and PEFT do). ``m`` starts as ``||W + s * B @ A||`` (``||W||`` for the
default init), so the adapted model starts equal to the base one.

Unmerged, the output is the base output plus (PEFT 0.21.2's formula, with ``k = m / ||W + s*B@A||``)::

    (k - 1) * (base - bias) + k * s * B(A(dropout(x)))

where ``base - bias`` is the layer's weight term for the same input as the update sees: the base
output less its bias, or, with dropout active (training, ``lora_dropout > 0``), the weight term
of the dropped input. The layer kind (`fxlora.kinds`) supplies what depends on the layer's type:
the norm per output feature, where it broadcasts, the weight term.

Neither the update nor the merge is additive (`LoraVariant`): the norm depends on the base
weight and the scale, so a merged DoRA adapter cannot be switched off through its branch, and
its merge ``W' = k * (W + delta)`` is undone by recomputing ``W' / k - delta`` (within rounding)
unless fxlora kept the pre-merge weight (`fxlora.core.fold`: it does, and restores it bit for bit).
Nothing here reads a module: the callers hand the tensors in.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from fxlora.variants.base import LoraVariant, register_variant

__all__ = ["DORA", "Magnitude", "dora_update", "dora_merged", "dora_unmerged"]

#: DoRA: neither its update nor its merge is additive; it carries a magnitude vector
DORA = register_variant(LoraVariant("dora", additive_update=False, additive_delta=False, magnitude=True))


class Magnitude(nn.Module):
    """Holder of one DoRA adapter's magnitude, so that it is named ``lora_magnitude_vector.<adapter>.weight``
    as in PEFT (shape: one value per output feature, as the layer kind lays it out)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


Factor = Union[float, torch.Tensor]


def dora_update(weight_term: torch.Tensor, update: torch.Tensor, factor: Factor, ratio: torch.Tensor) -> torch.Tensor:
    """What a DoRA adapter adds to the layer's output: ``(ratio - 1) * weight_term + ratio * update * factor``,
    with ``ratio = m / ||W + factor * B @ A||`` (broadcasting over the output), `update` the unscaled
    ``B(A(dropout(x)))`` and `weight_term` the layer's output without bias for the same input."""
    return (ratio - 1) * weight_term + ratio * update * factor


def dora_merged(weight: torch.Tensor, delta: torch.Tensor, ratio_on_weight: torch.Tensor) -> torch.Tensor:
    """The merged weight ``ratio * (weight + delta)`` (`ratio_on_weight` shaped to broadcast over the weight)."""
    return ratio_on_weight * (weight + delta)


def dora_unmerged(merged: torch.Tensor, delta: torch.Tensor, ratio_on_weight: torch.Tensor) -> torch.Tensor:
    """The weight before `dora_merged`, recomputed: ``merged / ratio - delta`` (exact only up to rounding)."""
    return merged / ratio_on_weight - delta
