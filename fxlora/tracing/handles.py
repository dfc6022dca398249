"""Proxies for registered handle objects (`fxlora.tracing.integrations.register_object_type`, e.g.
a transformers ``Cache``): `ObjectProxy` stands for such an argument, ``isinstance`` sees the
real type (it is part of the call pattern), and only the declared attributes may be used;
`TracedFlags` is a handle's flag dict whose contents the call pattern fixes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from fxlora.tracing.integrations import Flags, object_kind_of_type
from fxlora.tracing.proxies import InfoProxy, NotTraceable

__all__ = ["ObjectProxy", "TracedFlags"]


class ObjectProxy(InfoProxy):
    """Placeholder for a registered handle object of a known type (and known member types)."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, cls: type, kind: Any, members: dict[str, type]) -> None:
        super().__init__(node, tracer)
        object.__setattr__(self, "_fxlora_cls", cls)
        object.__setattr__(self, "_fxlora_kind", kind)
        object.__setattr__(self, "_fxlora_members", members)
        object.__setattr__(self, "_fxlora_tables", {})

    @property
    def __class__(self):  # isinstance(proxy, cls) answers for the real type
        return object.__getattribute__(self, "_fxlora_cls")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_fxlora_") or name in ("node", "tracer", "info"):
            raise AttributeError(name)
        cls = self._fxlora_cls
        if isinstance(self._fxlora_members.get(name), Flags):  # one table per handle: writes stay seen
            tables = self._fxlora_tables
            if name not in tables:
                tables[name] = TracedFlags(self, name, self._fxlora_members[name])
            return tables[name]
        if name in self._fxlora_members:
            node = self.tracer.create_proxy("call_function", getattr, (self, name), {}).node
            member = self._fxlora_members[name]
            truth = {"__bool__": v for k, v in self._fxlora_members.items() if k == f"{name}.__bool__"}
            return ObjectProxy(node, self.tracer, member, object_kind_of_type(member), truth)
        if self._fxlora_kind is None or name not in self._fxlora_kind.allowed(cls, self._fxlora_members):
            raise NotTraceable(f"{cls.__name__}.{name} is used; fxlora traces only declared attributes of it")
        return fx.proxy.Attribute(self, name)

    def __bool__(self) -> bool:
        truth = self._fxlora_members.get("__bool__")
        if truth is None:
            raise NotTraceable(f"truth value of a {self._fxlora_cls.__name__} argument")
        if self.node.users:  # used already: it may have changed since the call began
            raise NotTraceable(f"truth value of a {self._fxlora_cls.__name__} read after it was used")
        return truth.items


class TracedFlags:
    """A handle's flag dict whose contents the call pattern fixes (`Flags`): reads give those
    values; ``flags[k] = v`` records the write as a node on the real dict (run in program order)
    and later reads see it. Once the handle has been passed to anything but an attribute read or
    a method its kind declares flag-safe, its flags may have changed unseen: reading them then
    fails the trace."""

    def __init__(self, owner: "ObjectProxy", name: str, flags: Flags) -> None:
        self._owner, self._name = owner, name
        self._values = dict(flags.items)
        self._node = owner.tracer.create_proxy("call_function", getattr, (owner, name), {})

    def _current(self) -> dict:
        safe = self._owner._fxlora_kind.flag_safe
        for user in self._owner.node.users:
            if not ((user.op == "call_function" and user.target is getattr) or (user.op == "call_method" and user.target in safe)):
                raise NotTraceable(f"{self._name} of a {self._owner._fxlora_cls.__name__} read after it was passed to {user.format_node()}")
        return self._values

    def get(self, key: Any, default: Any = None) -> Any:
        return self._current().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self._current()[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._current()

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, fx.Proxy) or isinstance(value, fx.Proxy):
            raise NotTraceable(f"{self._name} of a handle set from a traced value")
        self._owner.tracer.create_proxy("call_function", operator.setitem, (self._node, key, value), {})
        self._current()[key] = value
