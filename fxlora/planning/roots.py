"""Tracing a candidate graph root for planning (`trace_root`), and the repeated blocks below it
that are planned as roots of their own (`repeated_blocks`).

A model built of N blocks of one class (a timm ViT's 12 ``Block``s in a ``Sequential``, a BERT
encoder's layers in a ``ModuleList``), inlined into one graph of the model, costs N times a
block's trace, passes and code generation at transform. Planned as graph roots of their own,
identical blocks are traced once (`fxlora.tracing.reuse.TraceCache`) and their code is built once
(`fxlora.runtime.builds`); the enclosing graph calls each block as a module, whose installed
forward runs the block's graph. The results are the same either way: the same operations on the
same tensors, in the same order.

Blocks are split off only where the example forward pass (`fxlora.tracing.probe`) saw each of them
called as a module, so that each is traced for the way it is really called; where the enclosing
graph does not trace with its blocks called whole (it reads their outputs in ways only an inlined
trace resolves), it is traced with them inlined, as without this rule.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch.nn as nn

from fxlora.boundary import boundary_of, can_be_root
from fxlora.errors import TraceFailure
from fxlora.tracing.boundaries import kept_children, traced_into
from fxlora.tracing.call_keys import CallKey, canonical_key, erase_sizes, key_in_form, key_is_ranked, key_is_sized, with_training
from fxlora.tracing.integrations import hooks_for
from fxlora.tracing.reuse import TraceCache
from fxlora.tracing.submodules import BLOCK_CONTAINERS, named_submodules
from fxlora.tracing.traced import TracedVariant, trace_through_ids, traceable_parents

__all__ = ["trace_root", "TracedRoot", "repeated_blocks", "check_callable_root", "BlocksOnly"]


@dataclass
class TracedRoot:
    """A candidate root as planning traced it: the graph of its first call pattern (by the key the
    root's calls are looked up with), the ids of the modules it traces through, the modules it
    calls as leaves (relative name -> why), and the other observed patterns, traced when first
    needed (`fxlora.runtime.forwards.GraphForward.pending`)."""

    variants: dict[CallKey, TracedVariant]
    through: set[int]
    leaves: dict[str, str]
    pending: tuple[CallKey, ...] = ()


class BlocksOnly(TraceFailure):
    """Every module to adapt in a candidate root is inside one of its repeated blocks: the blocks
    are the roots (`repeated_blocks`), the module itself runs its own forward."""


def trace_root(module: nn.Module, interesting: list, observed: dict, cache: TraceCache) -> TracedRoot:
    """`module` traced for its first call pattern (`TracedRoot`; its leaves are planned as roots
    of their own: modules kept whole, repeated blocks, and those tracing through which failed,
    `fxlora.tracing.traced.trace_variant`); raises `TraceFailure` where that pattern does not
    trace, or where its graph could call none of `interesting` itself (`BlocksOnly` where all of
    them are in repeated blocks).

    Its other observed patterns are not traced here: tracing them all (four for a transformers
    attention: with and without a mask and a KV cache, and each again for every family of blocks
    differing in ``layer_idx``) was half of ``transform`` on a tiny llama. They are traced when
    first needed: by the first call meeting one, or all of them when torch.compile next compiles
    (`fxlora.runtime.compile_builds`), so that a compiled model still meets no untraced pattern.
    One that then fails to trace runs the root's own forward, with the same math, and warns."""
    if not can_be_root(module):  # its call would not run a graph of its class forward
        raise TraceFailure(f"it cannot be a graph root: {boundary_of(module)}")
    kept = kept_children(module, interesting)  # called by the graph, planned as roots of their own
    blocks = {} if kept else repeated_blocks(module, interesting, observed)
    reach, parents = trace_through_ids(module, interesting), traceable_parents(module, interesting)
    if blocks:
        through = reach - _called_whole(module, blocks)
        if not through & parents:
            raise BlocksOnly(f"every module to adapt in it is inside one of its repeated blocks: {next(iter(blocks.values()))}")
        try:
            return _trace_with_leaves(module, observed, cache, blocks, through)
        except TraceFailure:  # the graph needs the blocks inlined: traced as without blocks
            pass
    through = reach - _called_whole(module, kept)
    if not through & parents:
        raise TraceFailure("each module to adapt in it sits inside a module its graph would call whole")
    return _trace_with_leaves(module, observed, cache, kept, through)


def _called_whole(root: nn.Module, leaves: Iterable[str]) -> set[int]:
    """Ids of the modules of `root` inside the `leaves` (relative names) its graph calls whole."""
    return {id(m) for name in leaves for m in root.get_submodule(name).modules()}


def _trace_with_leaves(module: nn.Module, observed: dict, cache: TraceCache, leaves: dict[str, str], through: set[int]) -> TracedRoot:
    first, *later = _root_patterns(module, observed)
    variant = cache.trace(module, through, first)
    found = dict(variant.leaves)
    sized, ranked = key_is_sized(variant.key), key_is_ranked(variant.key)
    key = _planned_key(first, variant, sized, ranked)
    pending = tuple(dict.fromkeys(k for k in (key_in_form(k, ranked, sized) for k in later) if k != key))
    return TracedRoot({key: variant}, through - _called_whole(module, found), {**leaves, **found}, pending)


def repeated_blocks(root: nn.Module, interesting: Iterable[nn.Module], observed: dict[int, list[CallKey]]) -> dict[str, str]:
    """The outermost repeated blocks below `root` on the paths its graph traces through, by
    relative name -> why (see the module docstring): modules of one class in one container
    (``nn.ModuleList``, ``nn.Sequential``, ``nn.ModuleDict``), two or more, each holding interesting modules without being one, each a possible root (`can_be_root`)
    traced through by `root`'s graph (no module boundary) and seen called by the example forward
    pass. Empty where no example forward pass ran (`observed` empty)."""
    if not observed:
        return {}
    wanted = {id(m) for m in interesting}
    hooks = hooks_for(root)
    holding = _holding(root, wanted)
    found: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        candidates: dict[type, list[str]] = defaultdict(list)
        opened: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            if id(child) in wanted or prefix + name not in holding or not traced_into(child, hooks):
                continue
            opened.append((name, child))
            if isinstance(module, BLOCK_CONTAINERS) and can_be_root(child) and id(child) in observed:
                candidates[type(child)].append(name)
        for cls, names in candidates.items():
            if len(names) > 1:
                why = (
                    f"one of {len(names)} {cls.__name__} blocks in {prefix[:-1] or 'it'}: each runs a graph of its own, "
                    "traced and built once for identical blocks"
                )
                found.update((prefix + name, why) for name in names)
        for name, child in opened:
            if prefix + name not in found:
                visit(child, prefix + name + ".")

    visit(root, "")
    return found


def _holding(root: nn.Module, wanted: set[int]) -> set[str]:
    """The relative names of the modules below `root` that hold a module of `wanted` (not counting itself)."""
    holding: set[str] = set()
    for name, module in named_submodules(root):
        if id(module) in wanted and name:
            parts = name.split(".")
            holding.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return holding


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
