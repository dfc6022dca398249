"""Guards: the plain attribute values a traced graph baked in.

A trace reads flags such as ``gradient_checkpointing`` or timm's ``fused_attn`` as Python values,
so its graph holds only while they keep the values they had (`guards_hold`); when one changes, the
pattern is traced again.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from fxlora.tracing.integrations import TraceHooks

__all__ = ["Guard", "guards_hold", "make_guards"]

class Guard(NamedTuple):
    """The plain attribute values one object had when a graph was traced: ``read(obj)`` gives
    them now (one C-level call for modules), ``values`` as they were."""

    obj: Any
    names: tuple[str, ...]
    read: Callable[[Any], Any]
    values: tuple


def guards_hold(guards: tuple[Guard, ...]) -> bool:
    """True while every guard ``(object, names, reader, values)`` still reads its values.

    Eagerly one C-level ``attrgetter`` call per guarded object; under ``torch.compile`` plain
    ``getattr`` (which dynamo traces, turning each value into one of its own guards)."""
    try:
        if torch.compiler.is_compiling():
            return all(tuple(getattr(obj, n) for n in names) == values for obj, names, _, values in guards)
        for obj, names, read, values in guards:
            got = read(obj)
            if (got if len(names) > 1 else (got,)) != values:
                return False
    except AttributeError:  # an attribute was deleted
        return False
    return True


_PLAIN = (bool, int, float, str, type(None))


#: plain attributes torch and transformers keep on modules for their own bookkeeping
_NOT_GUARDED = frozenset({"training", "_is_full_backward_hook", "_is_hf_initialized"})


def make_guards(traced_modules: list[nn.Module], hooks: TraceHooks) -> tuple[Guard, ...]:
    """Guards ``(object, names, reader, values)``: every plain attribute of the
    traced-through modules (their values are baked into the graph wherever forward reads them),
    and the attributes the integrations name. One guard per object, so checking costs one C call
    per traced module."""
    names: dict[int, tuple[Any, list[str]]] = {}
    for module in traced_modules:
        plain = [
            name
            for name, value in module.__dict__.items()
            if name not in _NOT_GUARDED and type(value) in _PLAIN and not (type(value) is float and math.isnan(value))
        ]
        names.setdefault(id(module), (module, []))[1].extend(plain)
        for obj, name in hooks.guards(module):
            if hasattr(obj, name):
                entry = names.setdefault(id(obj), (obj, []))[1]
                if name not in entry:
                    entry.append(name)
    guards = []
    for obj, attrs in names.values():
        if attrs:
            read = operator.attrgetter(*attrs) if isinstance(obj, nn.Module) else _RawAttributes(tuple(attrs))
            guards.append(Guard(obj, tuple(attrs), read, tuple(getattr(obj, n) for n in attrs)))
    return tuple(guards)


class _RawAttributes:
    """Reads attributes with ``object.__getattribute__`` (descriptors and properties included),
    skipping a class's own ``__getattribute__`` override (transformers configs have a slow one)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def __call__(self, obj: Any) -> Any:
        if len(self.names) == 1:  # like operator.attrgetter
            return object.__getattribute__(obj, self.names[0])
        return tuple(object.__getattribute__(obj, n) for n in self.names)
