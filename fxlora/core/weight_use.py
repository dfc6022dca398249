"""The weight a parent computes with when it hands an adapted layer's weight to other code.

torchvision's Swin attention calls ``shifted_window_attention(x, self.qkv.weight, self.proj.weight,
..., qkv_bias=self.qkv.bias, proj_bias=self.proj.bias)`` and never calls ``qkv`` or ``proj``: no
call of the layer exists where a branch could be added. An adapter that is a pure update of the
weight (no dropout on its input, no DoRA, no B bias) still has a meaning there: the layer's
weight *is* ``W + scaling * B @ A``. `adapted_weight` computes that weight for one call, with each
adapter at its run-time scale, exactly as a merge folds it in (`fxlora.core.fold`: the same
products, sum and single rounding), so outputs after ``merge_adapter`` equal those before, bit for
bit, and gradients reach A and B through it.

Refused with a ValueError naming the layer: a mixed batch (one weight serves every row) and an
adapter with dropout, DoRA or a B bias (added after planning; planning never puts such adapters
here: `fxlora.planning.call_checks.weight_use_targets`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from fxlora.dtypes import compute_dtype
from fxlora.core.fold import add_rounded, summed_update
from fxlora.core.layers import target_meta
from fxlora.core.ops import layer_scaling

__all__ = ["adapted_weight", "check_weight_use", "acts_through_weight", "some_act_through_weight"]


def _obstacles(spec: Any) -> list[tuple[str, Any]]:
    """The options of an adapter (`fxlora.core.layers.AdapterSpec`) that make it more than a weight update."""
    options = (("lora_dropout", spec.dropout), ("use_dora", spec.variant.magnitude), ("lora_bias", spec.lora_bias))
    return [(option, value) for option, value in options if value]


def _pure(layer: nn.Module) -> list[bool]:
    """For each adapter on `layer` (none if it is not adapted): is it a pure update of its weight."""
    meta = target_meta(layer)
    return [] if meta is None else [not _obstacles(s) for s in meta.adapters.values()]


def acts_through_weight(layer: nn.Module) -> bool:
    """`layer` carries adapters, each a pure update of its weight (what `adapted_weight` serves)."""
    pure = _pure(layer)
    return bool(pure) and all(pure)


def some_act_through_weight(layer: nn.Module) -> bool:
    """`layer` carries an adapter that is a pure update of its weight."""
    return any(_pure(layer))


def check_weight_use(layer: nn.Module, adapters: tuple[str, ...], where: str = "") -> None:
    """ValueError unless every adapter of `adapters` on `layer` is a pure update of its weight."""
    meta = target_meta(layer)
    for adapter in adapters:
        for option, value in _obstacles(meta.adapters[adapter])[:1]:
            raise ValueError(
                f"adapter {adapter!r} ({option}={value!r}) cannot act on {where or type(layer).__name__}: its parent "
                "passes the layer's weight to other code instead of calling it, so the adapter can only change the "
                f"weight, which has no place for {option}; use lora_dropout=0, no DoRA and no lora_bias for this layer"
            )


def adapted_weight(layer: nn.Module, gates: Any, adapters: tuple[str, ...], known: bool) -> torch.Tensor:
    """``layer.weight`` plus each adapter of `adapters` at its scale in the call's `gates`
    (`fxlora.core.gates.GateState`): Python numbers where `known` (eager code of a known state,
    which then lists only the live adapters), else the 0-d gate tensors (gated code, what
    torch.compile sees: a change of state changes no code).

    Requires: `check_weight_use` passed for `adapters` (`fxlora.passes.weight_uses` checks it
    when it builds the code)."""
    if known:
        update = summed_update(layer, {a: gates.scale[a] for a in adapters}, "weight")
        return layer.weight if update is None else add_rounded(layer.weight, update)
    return _gated(layer, gates, adapters)


def _gated(layer: nn.Module, gates: Any, adapters: tuple[str, ...]) -> torch.Tensor:
    meta = target_meta(layer)
    weight = layer.weight
    total: Optional[torch.Tensor] = None
    for adapter in adapters:
        gate = gates.scale_of(adapter, weight)
        if gate.dim() != 0:
            raise ValueError(
                f"a mixed batch (adapter_names) cannot run through {type(layer).__name__} layers whose parent passes "
                "their weight to other code: one weight serves every row; call the model once per adapter instead"
            )
        scaling = layer_scaling(layer, adapter, weight, gated=True)
        dtype = compute_dtype(weight, *meta.kind.weight_matrices(layer, adapter)["weight"])
        # the kind's product, as `fxlora.core.delta.delta_weight` takes it (without its merge-time
        # shape check, which torch.compile cannot trace), at the gate tensor's scale
        part = meta.kind.lora_weight(layer, adapter, meta.fan_in_fan_out, dtype) * (scaling * gate)
        total = part if total is None else total + part.to(total.dtype)
    return weight if total is None else add_rounded(weight, total)
