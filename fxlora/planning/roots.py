"""Tracing a candidate graph root for planning (`trace_root`): the modules its graph can trace
through and call, its call patterns, and the leaves it calls whole.
"""

from __future__ import annotations

import torch.nn as nn

from fxlora.boundary import boundary_of, can_be_root
from fxlora.errors import TraceFailure
from fxlora.tracing.boundaries import kept_children
from fxlora.tracing.call_keys import CallKey, canonical_key, erase_sizes, key_is_ranked, key_is_sized, with_training
from fxlora.tracing.reuse import TraceCache
from fxlora.tracing.traced import TracedVariant, trace_through_ids, traceable_parents

__all__ = ["trace_root", "check_callable_root"]


def trace_root(
    module: nn.Module, interesting: list, observed: dict, cache: TraceCache
) -> tuple[dict, set[int], dict[str, str]]:
    """The graphs of `module`'s call patterns (all with the same leaves), the ids of the modules
    they trace through, and the modules they call as leaves, planned as roots of their own (name
    -> why: children an integration keeps whole, and those tracing through which failed,
    `fxlora.tracing.traced.trace_variant`); raises `TraceFailure` unless every pattern traces, or
    where its graph could call none of `interesting` itself."""
    if not can_be_root(module):  # its call would not run a graph of its class forward
        raise TraceFailure(f"it cannot be a graph root: {boundary_of(module)}")
    leaves = kept_children(module, interesting)  # called by the graph, planned as roots of their own
    through = trace_through_ids(module, interesting) - {id(m) for name in leaves for m in module.get_submodule(name).modules()}
    if not (through & traceable_parents(module, interesting)):
        raise TraceFailure("each module to adapt in it sits inside a module its graph would call whole")
    while True:
        traced = [(key, cache.trace(module, through, key)) for key in _root_patterns(module, observed)]
        found = {name: why for _, v in traced for name, why in v.leaves}
        leaves.update(found)
        through = through - {id(m) for name in found for m in module.get_submodule(name).modules()}
        if all(len(v.leaves) == len(found) for _, v in traced):  # the same leaves in every pattern
            break
    sized, ranked = (any(test(v.key) for _, v in traced) for test in (key_is_sized, key_is_ranked))
    return {_planned_key(key, v, sized, ranked): v for key, v in traced}, through, leaves


def _root_patterns(module: nn.Module, observed: dict[int, list[CallKey]]) -> list[CallKey]:
    """The call patterns to plan `module` for: those observed (`fxlora.tracing.probe`), else its plainest
    call; in the module's current train/eval mode (the other mode is traced when the model
    switches to it: `LoraModel.train`)."""
    keys = observed.get(id(module))
    if keys:  # one per pattern with ranks: others of size classes only are traced when met
        unique: dict[CallKey, CallKey] = {}
        for k in keys:
            unique.setdefault(erase_sizes(k), k)
        return [with_training(k, module.training) for k in unique.values()]
    return [canonical_key(module, module.training)]


def _planned_key(observed: CallKey, variant: TracedVariant, sized: bool, ranked: bool) -> CallKey:
    """The key a root's variant is kept under: as traced, or as observed with ranks (and size classes) if one needed them."""
    if sized:
        return observed
    return erase_sizes(observed) if ranked else variant.key


def check_callable_root(module: nn.Module, is_model: bool, observed: dict[int, list[CallKey]]) -> None:
    """Where a forward pass was observed (`fxlora.tracing.probe`), a sub-module that was never called as a
    module (its parent reaches into it) would never run its graph: it is no root. (Its layers
    still compute with LoRA: each keeps its eager forward.)"""
    if not is_model and observed and id(module) not in observed:
        if any(id(m) in observed for m in module.modules()):
            raise TraceFailure(
                "it is not called as a module in the model's forward: in fxlora's example forward pass "
                "modules inside it ran, but it was never called itself (its parent reaches into it)"
            )
        raise TraceFailure(
            "fxlora's example forward pass (run to see how each module is called) never reached it "
            "nor anything inside it: it may run only for other inputs, or not at all"
        )
