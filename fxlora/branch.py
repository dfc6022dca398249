"""The LoRA computation, written once.

`lora_output` is what an adapted layer returns: its base output plus, for every adapter on it,
``B(A(dropout(x))) * scaling * gate``. The eager path calls it directly; the graph path traces it
with torch.fx (`fxlora.passes.insert_lora`) and splices the nodes after the layer's own node, so
both paths run the very same operations. `saved_output` is the same for `modules_to_save`.

Requires of `module`: adapters attached by `fxlora.layers.attach_adapter`.

Rule for this file: no arithmetic on the module's tensors here — hand them to an op in
`fxlora.ops`, so that tracing records them as attribute reads instead of baking in their values.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .layers import target_meta, saved_meta
from .layers import TargetMeta
from .ops import (
    add_linear_product,
    add_update,
    cast_like,
    scale_by,
    scale_update,
    select_output,
    stacked_layer_update,
    stacked_linear_update,
)

__all__ = ["lora_output", "saved_output", "stackable", "Live"]

# Keep the ops opaque when this module's functions are traced: one node each.
for _name in (
    "add_linear_product",
    "add_update",
    "cast_like",
    "scale_by",
    "scale_update",
    "select_output",
    "stacked_layer_update",
    "stacked_linear_update",
):
    torch.fx.wrap(_name)


#: (adapter, gate value) of the branches that run; a gate value of None means the gate tensor
#: decides, with one value per batch row (a mixed batch)
Live = Optional[tuple[tuple[str, Optional[float]], ...]]


def _bare_linear(meta: TargetMeta, adapters: list[str]) -> bool:
    """A layer of a stackable kind (`fxlora.kinds.LayerKind.stackable`: linear) whose given
    adapters are additive (`fxlora.variants`) and have neither a B bias nor dropout."""
    if not meta.kind.stackable:
        return False
    specs = [meta.adapters[a] for a in adapters]
    return all(s.variant.additive_update and not s.lora_bias and not s.dropout > 0 for s in specs)


def stackable(meta: TargetMeta, adapters: list[str]) -> bool:
    """Several adapters of a linear layer without B biases or dropout: their updates can be
    computed together from stacked weights (`stacked_linear_update`). Decided from the layer's
    record alone, so tracing this decision adds no node."""
    return len(adapters) >= 2 and _bare_linear(meta, adapters)


def _plain_linear(meta: TargetMeta, adapters: list[str]) -> bool:
    """One adapter on a linear layer, without B bias or dropout: A product, then one addmm."""
    return len(adapters) == 1 and _bare_linear(meta, adapters)


def _serves_rows(meta: TargetMeta, adapters: list[str], live: Live) -> bool:
    """Eager code of a mixed batch (row gates) on a linear layer whose adapters have neither a B
    bias nor dropout: one `stacked_layer_update` node reads the layer's tensors itself."""
    if live is None or not adapters or any(gate is not None for _, gate in live):
        return False
    return _bare_linear(meta, adapters)


def _live_adapters(meta: TargetMeta, live: Live) -> list[str]:
    """The layer's adapters whose branch runs: all of them in gated code, else the live ones."""
    if live is None:
        return list(meta.adapters)
    return [a for a in meta.adapters if a in dict(live)]


def _factors(module: nn.Module, meta: TargetMeta, adapters: list[str], live: Live) -> list:
    """Each adapter's multiplier: its scaling and gate tensors (gated code, or a gate with one
    value per row), or, for eager code of a known state, the Python number ``scaling * gate``."""
    gates = {} if live is None else dict(live)
    return [
        meta.adapters[a].scaling * gates[a]
        if gates.get(a) is not None
        else (getattr(module.lora_scaling, a), getattr(module.lora_gates.scale, a))
        for a in adapters
    ]


def _scaled(update: torch.Tensor, factor) -> torch.Tensor:
    return scale_by(update, factor) if isinstance(factor, float) else scale_update(update, *factor)


def lora_output(module: nn.Module, x: torch.Tensor, base: torch.Tensor, live: Live = None) -> torch.Tensor:
    """`base` (the layer's own output for input `x`) plus every adapter's gated, scaled update.

    `live` None: every adapter's branch, each multiplied by its scaling and gate *tensors* (the
    code torch.compile sees: adapter state never changes it). `live` given (eager code for a known
    adapter state, `AdapterGates.eager_state`): only those adapters, multiplied by Python numbers,
    or by their tensors where the gates hold one value per row (a mixed batch).
    """
    meta = target_meta(module)
    adapters = _live_adapters(meta, live)
    if _serves_rows(meta, adapters, live):
        return stacked_layer_update(x, base, module, tuple(adapters))
    factors = _factors(module, meta, adapters, live)
    if live is not None and _plain_linear(meta, adapters):
        weight = module.lora_A[adapters[0]].weight
        hidden = F.linear(cast_like(x, weight), weight)
        return add_linear_product(base, hidden, module.lora_B[adapters[0]].weight, factors[0])
    if stackable(meta, adapters):
        return stacked_linear_update(
            x, [module.lora_A[a].weight for a in adapters], [module.lora_B[a].weight for a in adapters], factors, base
        )
    total = None
    for adapter, factor in zip(adapters, factors):
        update = _scaled(meta.kind.update(module, adapter, x, base), factor)
        total = update if total is None else total + update
    return base if total is None else add_update(base, total)


def saved_output(
    module: nn.Module, original: Callable[..., Any], args: tuple, kwargs: dict, chosen: Optional[tuple[str, ...]] = None
) -> Any:
    """The output of a `modules_to_save` module: its trainable copy's wherever that copy's adapter
    is selected, else the original's (`original(*args, **kwargs)`). With `chosen` (the selected
    adapters, known in Python) only the module that is used runs."""
    adapters = saved_meta(module).adapters
    if chosen is not None:
        picked = [a for a in adapters if a in chosen]
        return module.modules_to_save[picked[-1]](*args, **kwargs) if picked else original(*args, **kwargs)
    out = original(*args, **kwargs)
    for adapter in adapters:
        copy_out = module.modules_to_save[adapter](*args, **kwargs)
        out = select_output(getattr(module.lora_gates.select, adapter), copy_out, out)
    return out
