"""The LoRA computation, written once.

`lora_output` is what an adapted layer returns: its base output plus, for every adapter on it,
``B(A(dropout(x))) * scaling * gate``. The eager path calls it directly; the graph path traces it
with torch.fx (`fxlora.passes.insert_lora`) and splices the nodes after the layer's own node, so
both paths run the very same operations. `saved_output` is the same for `modules_to_save`.

Requires of `module`: adapters attached by `fxlora.core.layers.attach_adapter`.

Rule for this file: no arithmetic on the module's tensors here — hand them to an op in
`fxlora.core.ops`, so that tracing records them as attribute reads instead of baking in their values.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxlora.boundary import calls_plainly
from fxlora.dtypes import cast_like
from fxlora.core.gates import EagerKey
from fxlora.core.dora import dora_output
from fxlora.core.dropped_linear import dropped_linear
from fxlora.core.layers import TargetMeta, saved_meta, target_meta
from fxlora.core.own_rows import is_row_gated, own_rows_output
from fxlora.core.ops import adapter_gate, add_linear_product, add_update, eager_factor, scale_by, scale_update, layer_scaling, select_gate, select_output, stacked_layer_update, stacked_linear_update

__all__ = ["lora_output", "own_output", "saved_output", "stackable", "branch_adapters"]

# Keep the ops opaque when this module's functions are traced: one node each.
for _name in (
    "adapter_gate",
    "add_linear_product",
    "add_update",
    "cast_like",
    "dora_output",
    "dropped_linear",
    "eager_factor",
    "layer_scaling",
    "scale_by",
    "scale_update",
    "select_gate",
    "select_output",
    "stacked_layer_update",
    "stacked_linear_update",
):
    torch.fx.wrap(_name)




def _bare_linear(module: nn.Module, meta: TargetMeta, adapters: list[str], dropout: bool = False) -> bool:
    """A layer of a stackable kind (`fxlora.kinds.LayerKind.stackable`: linear) whose given
    adapters are additive (`fxlora.variants`), have no B bias and (unless `dropout`) no
    dropout, and whose factor modules compute plainly (`fxlora.boundary.calls_plainly`: no hook,
    no offloading wrapper), so that their weights can be read instead of calling them."""
    if not meta.kind.stackable:
        return False
    specs = [meta.adapters[a] for a in adapters]
    if not all(s.variant.additive_update and not s.lora_bias and (dropout or not s.dropout > 0) for s in specs):
        return False
    return all(calls_plainly(module.lora_A[a]) and calls_plainly(module.lora_B[a]) for a in adapters)


def stackable(module: nn.Module, meta: TargetMeta, adapters: list[str]) -> bool:
    """Several adapters of a linear layer without B biases or dropout: their updates can be
    computed together from stacked weights (`stacked_linear_update`). Decided from the layer's
    record alone, so tracing this decision adds no node."""
    return len(adapters) >= 2 and _bare_linear(module, meta, adapters)


def _plain_linear(module: nn.Module, meta: TargetMeta, adapters: list[str]) -> bool:
    """One adapter on a linear layer, without B bias: A product (of the dropped input, keeping
    the input: `fxlora.core.dropped_linear`), then one addmm."""
    return len(adapters) == 1 and _bare_linear(module, meta, adapters, dropout=True)


def _low_rank(module: nn.Module, meta: TargetMeta, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """``A(dropout(x))`` of a linear layer's `adapter`, in A's dtype."""
    weight = module.lora_A[adapter].weight
    x = cast_like(x, weight)
    if meta.adapters[adapter].dropout > 0:
        return dropped_linear(x, weight, module.lora_dropout[adapter])
    return F.linear(x, weight)


def _serves_rows(module: nn.Module, meta: TargetMeta, adapters: list[str], eager: Optional[EagerKey]) -> bool:
    """Eager code of a mixed batch (row gates) on a linear layer whose adapters have neither a B
    bias nor dropout: one `stacked_layer_update` node reads the layer's tensors itself."""
    return eager is not None and eager.rows and bool(adapters) and _bare_linear(module, meta, adapters)


def branch_adapters(meta: TargetMeta, eager: Optional[EagerKey]) -> list[str]:
    """The layer's adapters whose branch runs: all of them in gated code and in a mixed batch,
    else the live ones."""
    if eager is None or eager.rows:
        return list(meta.adapters)
    return [a for a in meta.adapters if a in eager.live]


def _factors(gates: Any, x: torch.Tensor, adapters: list[str], scalings: dict, eager: Optional[EagerKey]) -> list:
    """Each adapter's multiplier: for eager code of a known state the Python number ``scaling *
    gate`` read from the call's `gates`, else ``(scaling, gate tensor)`` (gated code, or a mixed
    batch's gate with one value per row)."""
    if eager is not None and not eager.rows:
        return [eager_factor(gates, a, scalings[a]) for a in adapters]
    return [(scalings[a], adapter_gate(gates, a, x)) for a in adapters]


def _scaling(module: nn.Module, meta: TargetMeta, adapter: str, x: torch.Tensor, eager: Optional[EagerKey], given: Optional[dict]) -> Any:
    """An adapter's scaling: in gated code a hot-swap slot's tensor (`layer_scaling`, on `x`'s
    device), else the number given (a template's input) or the layer's spec's."""
    if given is not None and (eager is not None or meta.adapters[adapter].scaling_cell is None):
        return given[adapter]
    return layer_scaling(module, adapter, x, gated=eager is None)


def lora_output(
    module: nn.Module,
    x: torch.Tensor,
    base: torch.Tensor,
    gates: Any,
    eager: Optional[EagerKey] = None,
    scalings: Optional[dict] = None,
) -> torch.Tensor:
    """`base` (the layer's own output for input `x`) plus every adapter's gated, scaled update,
    with the gates of the call (`gates`: a `fxlora.core.gates.GateState`).

    `eager` None: every adapter's branch, each multiplied by its scaling and gate *tensor* (the
    code torch.compile sees: adapter state never changes it). `eager` given (eager code for a kind
    of state, `fxlora.core.gates.EagerKey`): only the live adapters, multiplied by Python numbers read
    from `gates`, or by their row gate tensors in a mixed batch. `scalings` (adapter -> alpha/r,
    default: the layer's specs) is given as values when the function is traced into a template;
    gated code reads a hot-swap slot's scaling tensor instead (`fxlora.model.hotswap`).
    """
    meta = target_meta(module)
    adapters = branch_adapters(meta, eager)
    scalings = {a: _scaling(module, meta, a, x, eager, scalings) for a in adapters}
    if _serves_rows(module, meta, adapters, eager):
        return stacked_layer_update(x, base, module, tuple(adapters), gates, tuple(scalings[a] for a in adapters))
    factors = _factors(gates, x, adapters, scalings, eager)
    known = eager is not None and not eager.rows
    if known and _plain_linear(module, meta, adapters):
        hidden = _low_rank(module, meta, adapters[0], x)
        return add_linear_product(base, hidden, module.lora_B[adapters[0]].weight, factors[0])
    if stackable(module, meta, adapters):
        return stacked_linear_update(
            x, [module.lora_A[a].weight for a in adapters], [module.lora_B[a].weight for a in adapters], factors, base
        )
    if any(meta.adapters[a].variant.magnitude for a in adapters):
        return _in_turn(module, meta, x, base, adapters, factors, known)
    total = None
    for adapter, factor in zip(adapters, factors):
        update = meta.kind.update(module, adapter, x, base)
        update = scale_by(update, factor) if known else scale_update(update, *factor)
        total = update if total is None else total + update
    return base if total is None else add_update(base, total)


def own_output(module: nn.Module, args: tuple, kwargs: dict, gates: Any, eager: Optional[EagerKey], rows_of: Optional[torch.Tensor] = None) -> Any:
    """The output of the call ``module(*args, **kwargs)`` of a layer whose kind computes its adapted
    call itself (`fxlora.kinds.LayerKind.own_call`), with each adapter whose branch runs at its
    multiplier as in `lora_output` (a Python number in eager code of a known state, else
    ``(scaling, gate tensor)``). A mixed batch (row gates) combines calls with one adapter each,
    entry by entry (`fxlora.core.own_rows`; `rows_of`: the batch-first tensor the layer's first
    input was reshaped from, passed by graph code, or None)."""
    meta = target_meta(module)
    adapters = branch_adapters(meta, eager)
    if adapters and is_row_gated(gates):  # no adapter to run (base code): no row to tell apart
        return own_rows_output(module, meta, adapters, args, kwargs, gates, eager, rows_of)
    like = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    factors = _factors(gates, like, adapters, {a: layer_scaling(module, a, like, eager is None) for a in adapters}, eager)
    return meta.kind.adapted_call(module, args, kwargs, dict(zip(adapters, factors)))


def _in_turn(module: nn.Module, meta: TargetMeta, x: torch.Tensor, base: torch.Tensor, adapters: list[str], factors: list, known: bool) -> torch.Tensor:
    """The adapters' updates applied one after the other, in the layer's order, as PEFT applies
    its active adapters: a DoRA adapter (`fxlora.core.dora.dora_output`) rescales the output so
    far (less the bias), so with several adapters on a layer the order counts."""
    out = base
    for adapter, factor in zip(adapters, factors):
        if meta.adapters[adapter].variant.magnitude:
            out = dora_output(module, adapter, x, out, factor) if known else dora_output(module, adapter, x, out, *factor)
            continue
        update = meta.kind.update(module, adapter, x, base)
        out = add_update(out, scale_by(update, factor) if known else scale_update(update, *factor))
    return out


def saved_output(module: nn.Module, original: Callable[..., Any], args: tuple, kwargs: dict, gates: Any, eager: Optional[EagerKey]) -> Any:
    """The output of a `modules_to_save` module: its trainable copy's wherever that copy's adapter
    is selected in the call's `gates`, else the original's (`original(*args, **kwargs)`). For eager
    code of a known state (`eager`) only the module that is used runs."""
    adapters = saved_meta(module).adapters
    chosen = None if eager is None else eager.chosen
    if chosen is not None:
        picked = [a for a in adapters if a in chosen]
        return module.modules_to_save[picked[-1]](*args, **kwargs) if picked else original(*args, **kwargs)
    out = original(*args, **kwargs)
    for adapter in adapters:
        copy_out = module.modules_to_save[adapter](*args, **kwargs)
        out = select_output(select_gate(gates, adapter, copy_out), copy_out, out)
    return out
