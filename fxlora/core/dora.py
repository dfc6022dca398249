"""DoRA on one layer (`fxlora.variants.dora`): its branch and its merge.

`dora_output` is one opaque op of the branch (`fxlora.core.branch` wraps it for torch.fx, and
torch.compile traces straight through it: no graph break): it reads the layer's tensors itself,
so that the branch's template stays straight-line code whatever the layer's mode (dropout is
decided at run time, as PEFT decides it). `dora_fold` / `dora_unfold` are the merge rule
(`fxlora.core.fold` keeps the records).

Requires of the layer: the adapter attached with a magnitude (`fxlora.core.layers.attach_adapter`).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from fxlora.core.delta import delta_weight
from fxlora.core.layers import target_meta
from fxlora.dtypes import compute_dtype
from fxlora.variants.dora import dora_merged, dora_unmerged, dora_update

__all__ = ["dora_output", "dora_ratio", "dora_fold", "dora_unfold"]


def _first_open(gate: torch.Tensor) -> torch.Tensor:
    """The gate's value (0-d) or, for one value per row (a mixed batch: 0, or the adapter's one
    wanted scale), its first non-zero value (0 if none)."""
    if gate.dim() == 0:
        return gate
    open_rows = gate.ne(0)
    first = open_rows & (open_rows.cumsum(0) == 1)  # no data-dependent index: compiles without a break
    return torch.where(first, gate, 0).sum()  # one term: exact


def _on_rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask if mask.dim() == 0 else mask.view(-1, *(1,) * (like.dim() - 1))


def dora_output(
    layer: nn.Module, adapter: str, x: torch.Tensor, out: torch.Tensor, scaling: float, gate: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`out` (the layer's output so far for input `x`) plus `adapter`'s DoRA update at factor
    `scaling` (eager code of a known state: ``scaling * scale``) or ``scaling * gate`` (a 0-d gate
    tensor, or one value per row), zero where the gate is 0. PEFT's formula (see
    `fxlora.variants.dora`), the norm detached; computed in the adapter's dtype, the sum rounded
    into `out`'s."""
    meta = target_meta(layer)
    kind = meta.kind
    update, weight_term = kind.dora_terms(layer, adapter, x, out)
    dtype = update.dtype
    factor: Union[float, torch.Tensor] = scaling if gate is None else (_first_open(gate) * scaling).to(dtype)
    lora_weight = kind.lora_weight(layer, adapter, meta.fan_in_fan_out, dtype).detach()
    norm = kind.dora_norm(layer, layer.weight.to(dtype) + factor * lora_weight).detach()
    ratio = layer.lora_magnitude_vector[adapter].weight / norm
    contribution = dora_update(weight_term, update, factor, ratio)
    if gate is not None:
        contribution = torch.where(_on_rows(gate.ne(0), contribution), contribution, 0)
    total = out + contribution
    return total if total.dtype == out.dtype else total.to(out.dtype)


def dora_ratio(module: nn.Module, adapter: str, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``m / ||weight + delta||`` shaped to broadcast over the weight, in `delta`'s dtype."""
    kind = target_meta(module).kind
    magnitude = module.lora_magnitude_vector[adapter].weight.detach()
    norm = kind.dora_norm(module, weight.to(delta.dtype) + delta)
    return kind.dora_on_weight(module, magnitude.to(delta.dtype) / norm)


def _delta(module: nn.Module, adapter: str, scale: float, weight: torch.Tensor) -> torch.Tensor:
    return delta_weight(module, adapter, scale, compute_dtype(weight, module.lora_magnitude_vector[adapter].weight))


def dora_fold(module: nn.Module, adapter: str, scale: float, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(merged, ratio)``: the weight `original` with the DoRA adapter merged at run-time scale
    `scale`, ``round(ratio * (W + delta))`` with ``ratio = m / ||W + delta||`` (computed in float32
    or wider, rounded once into `original`'s dtype), and that ratio (shaped to broadcast over the
    weight), which `dora_unfold` needs: it cannot be read back from the merged weight."""
    delta = _delta(module, adapter, scale, original)
    ratio = dora_ratio(module, adapter, original, delta)
    return dora_merged(original.to(delta.dtype), delta, ratio).to(original.dtype), ratio


def dora_unfold(module: nn.Module, adapter: str, scale: float, merged: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The weight before `dora_fold`, recomputed from `merged` and the fold's `ratio`:
    ``merged / ratio - delta``, exact only up to rounding (`fxlora.core.fold` restores its kept
    copy bit for bit where nothing changed since the merge)."""
    delta = _delta(module, adapter, scale, merged)
    return dora_unmerged(merged.to(delta.dtype), delta, ratio.to(delta.dtype)).to(merged.dtype)
