"""Tracing identical roots once: `TraceCache`.

The blocks of a model (32 decoder layers of one class, built from one config) give the same
graph for the same call pattern: tracing each again is most of ``transform``'s time. A root's
*fingerprint* (`fingerprint`) is everything its trace can depend on: its class and the call
pattern; for every module of its subtree, its relative name, class, whether it is traced
through, its plain attribute values and its tensors' shapes, dtypes and devices; the values of
the attributes the library integrations guard. Two roots with one fingerprint trace to the same
graph (its nodes name modules by relative path), so the second reuses the first's graph, inputs
and trace-time constants, with guards and the inlined-modules record made for its own modules.

A cache lives for one planning pass (`fxlora.planning.plan.assign_paths`); a failure to trace is
remembered too, so identical untraceable roots fail once.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Optional, Union

import torch.nn as nn

from fxlora.errors import TraceFailure
from fxlora.tracing.boundaries import inlined
from fxlora.tracing.call_keys import CallKey
from fxlora.tracing.guards import make_guards
from fxlora.tracing.integrations import hooks_for
from fxlora.tracing.traced import TracedVariant, trace_variant, traced_modules

__all__ = ["TraceCache", "fingerprint"]

_PLAIN = (bool, int, float, str, type(None))


def _plain_attributes(module: nn.Module) -> tuple:
    return tuple(
        (name, value)
        for name, value in sorted(module.__dict__.items())
        if type(value) in _PLAIN and not (type(value) is float and math.isnan(value))
    )


def _tensors(module: nn.Module) -> tuple:
    own = list(module._parameters.items()) + list(module._buffers.items())
    return tuple((n, None if t is None else (tuple(t.shape), t.dtype, t.device.type)) for n, t in own)


def fingerprint(root: nn.Module, trace_through: set[int], key: CallKey) -> Optional[Hashable]:
    """What a trace of `root` for `key` depends on (see the module docstring); None when some
    value cannot be compared (then nothing is reused)."""
    hooks = hooks_for(root)
    parts: list[Any] = [type(root), key]
    for name, module in root.named_modules():
        parts.append((name, type(module), id(module) in trace_through, _plain_attributes(module), _tensors(module)))
        for obj, attr in hooks.guards(module):
            parts.append((attr, getattr(obj, attr, None)))
    value = tuple(parts)
    try:
        hash(value)
    except TypeError:
        return None
    return value


class TraceCache:
    """Traced variants (or trace failures) by fingerprint, for one planning pass."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, Union[TracedVariant, TraceFailure]] = {}

    def trace(self, root: nn.Module, trace_through: set[int], key: CallKey) -> TracedVariant:
        """`fxlora.tracing.traced.trace_variant`, or a copy of an identical root's trace made
        for `root` (same graph, inputs and constants; `root`'s own guards and inlined modules)."""
        found = fingerprint(root, trace_through, key)
        if found is None:
            return trace_variant(root, trace_through, key)
        entry = self._entries.get(found)
        if entry is None:
            try:
                entry = trace_variant(root, trace_through, key)
            except TraceFailure as exc:
                self._entries[found] = exc
                raise
            self._entries[found] = entry
            return entry
        if isinstance(entry, TraceFailure):
            raise TraceFailure(str(entry))
        traced = traced_modules(root, trace_through, entry.leaves)
        return TracedVariant(
            graph=entry.graph,
            inputs=entry.inputs,
            constants=entry.constants,
            key=entry.key,
            guards=make_guards(traced, hooks_for(root)),
            inlined=inlined(root, traced),
            leaves=entry.leaves,
        )
