"""A call pattern made concrete for tracing (`CallTemplate`): its constants are values, its
tensors and handles `Slot`s that become the graph's placeholders.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fxlora.errors import TraceFailure
from fxlora.tracing.call_keys import OBJECT, TENSOR, CallKey, Source, is_ranked_tensor
from fxlora.tracing.integrations import object_kind_of_type

__all__ = ["Slot", "CallTemplate"]


@dataclass
class Slot:
    """One placeholder of a call template: a tensor or a handle object inside the call."""

    source: Source
    name: str
    rank: Optional[int] = None
    classes: Optional[tuple[int, ...]] = None  # each dimension's size class (a sized pattern)
    cls: Optional[type] = None
    object: Any = None  # the registered ObjectKind of `cls`
    members: dict = field(default_factory=dict)  # member name -> type, for handles


class CallTemplate:
    """A call pattern made concrete for tracing: constants are values, tensors and handles are
    `Slot`s that become placeholders (`build` puts the proxies in)."""

    def __init__(self, fn: Callable, key: CallKey) -> None:
        self.fn = fn
        self.slots: list[Slot] = []
        _, pos_kinds, named_kinds = key
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())[1:]
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        by_name = {p.name: p for p in params}
        takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
        for name, _ in named_kinds:
            p = by_name.get(name)
            if (p is None and not takes_any_keyword) or (p is not None and p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD)):
                raise TraceFailure(f"keyword argument {name!r} is not a named parameter of forward")
        self._taken: set[str] = {"fxlora_root"}
        self.args = [
            self._template(k, i, positional[i] if i < len(positional) else f"arg{i}") for i, k in enumerate(pos_kinds)
        ]
        self.kwargs = {n: self._template(k, n, n) for n, k in named_kinds}
        try:
            sig.bind(None, *self.args, **self.kwargs)
        except TypeError as exc:
            raise TraceFailure(f"forward() cannot take this call: {exc}") from None

    def _name(self, wanted: str) -> str:
        name = wanted if wanted.isidentifier() else "input"
        base, i = name, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def _template(self, kind: Any, source: Source, name: str) -> Any:
        if kind == TENSOR or is_ranked_tensor(kind):
            ranked = kind != TENSOR
            slot = Slot(source, self._name(name), rank=kind[1] if ranked else None, classes=kind[2] if ranked and len(kind) == 3 else None)
        elif type(kind) is tuple and kind[0] == OBJECT:
            slot = Slot(source, self._name(name), cls=kind[1], object=object_kind_of_type(kind[1]), members=dict(kind[2]))
            if slot.object is None:
                raise TraceFailure(f"{kind[1].__name__} arguments are not traced (no integration declares them)")
        elif type(kind) is tuple and kind[0] in ("tuple", "list"):
            head = source if type(source) is tuple else (source,)
            items = [self._template(k, (*head, i), f"{name}_{i}") for i, k in enumerate(kind[1])]
            return tuple(items) if kind[0] == "tuple" else items
        else:
            return kind[1]  # a constant
        self.slots.append(slot)
        return slot

    def build(self, values: tuple) -> tuple[list, dict]:
        """The call's ``(args, kwargs)`` with the slots' values (proxies while tracing) in place."""
        by_slot = {id(slot): v for slot, v in zip(self.slots, values)}

        def fill(t: Any) -> Any:
            if isinstance(t, Slot):
                return by_slot[id(t)]
            if type(t) in (tuple, list):
                return type(t)(fill(x) for x in t)
            return t

        return [fill(a) for a in self.args], {n: fill(v) for n, v in self.kwargs.items()}
