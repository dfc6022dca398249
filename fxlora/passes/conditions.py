"""Conditions several pass contracts share. Each returns the first node violating it, or None.

They look at module records (`fxlora.core.layers.target_meta` / `saved_meta`) and at tags
(`fxlora.passes.tags`), never at module paths.
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import Any, Callable, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.layers import saved_meta, target_meta
from fxlora.core.weight_use import adapted_weight
from fxlora.passes.tags import Role, has_role, tag_of
from fxlora.tracing.submodules import submodule

__all__ = [
    "is_adapted",
    "is_saved",
    "called_module",
    "resolve",
    "not_a_leaf",
    "writes_in_place",
    "untagged_call",
    "untagged_adapted_call",
    "BRANCHES_INSERTED",
    "keyword_call",
    "branch_of",
]


def is_adapted(module: nn.Module) -> bool:
    """`module` carries LoRA adapters (`fxlora.core.layers.TargetMeta`)."""
    return target_meta(module) is not None


def is_saved(module: nn.Module) -> bool:
    """`module` is a `modules_to_save` entry (`fxlora.core.layers.SavedMeta`)."""
    return saved_meta(module) is not None


def called_module(node: fx.Node, root: nn.Module) -> Optional[nn.Module]:
    """The module a ``call_module`` node calls; None for any other node."""
    return submodule(root, node.target) if node.op == "call_module" else None


def resolve(root: nn.Module, target: str) -> Any:
    """The object a ``call_module`` / ``get_attr`` target names on `root` (None if none)."""
    try:
        return functools.reduce(getattr, target.split("."), root) if target else root
    except AttributeError:
        return None


def _inner_modules(root: nn.Module, owner: Callable[[nn.Module], bool]) -> set[int]:
    """ids of the modules strictly inside a module `owner` accepts."""
    inner: set[int] = set()
    for module in root.modules():
        if owner(module):
            inner.update(id(m) for m in module.modules() if m is not module)
    return inner


def _call_inside(graph: fx.Graph, root: nn.Module, owner: Callable[[nn.Module], bool]) -> Optional[fx.Node]:
    """A call of a module nested inside a module `owner` accepts."""
    inner = _inner_modules(root, owner)
    return next((n for n in graph.find_nodes(op="call_module") if id(called_module(n, root)) in inner), None)


def _read_uncalled(graph: fx.Graph, root: nn.Module, owner: Callable[[nn.Module], bool]) -> Optional[fx.Node]:
    """A read of the own tensors of a module `owner` accepts that the graph never calls (nor hands
    its adapted weight to other code, `fxlora.passes.weight_uses`)."""
    own = {
        id(tensor): module
        for module in root.modules()
        if owner(module)
        for tensor in itertools.chain(module._parameters.values(), module._buffers.values())
        if tensor is not None
    }
    called = {id(called_module(n, root)) for n in graph.find_nodes(op="call_module")}
    called |= {id(resolve(root, n.args[0].target)) for n in graph.find_nodes(op="call_function", target=adapted_weight)}
    for node in graph.find_nodes(op="get_attr"):
        module = own.get(id(resolve(root, node.target)))
        if module is not None and id(module) not in called:
            return node
    return None


def not_a_leaf(graph: fx.Graph, root: nn.Module, owner: Callable[[nn.Module], bool]) -> Optional[fx.Node]:
    """Evidence that a module `owner` accepts was traced into instead of being one leaf call: a
    call of a module nested inside it, or a read of its own tensors while it is never called
    (a tied weight read next to the module's own call is fine)."""
    return _call_inside(graph, root, owner) or _read_uncalled(graph, root, owner)


def untagged_call(graph: fx.Graph, root: nn.Module, kind: Callable[[nn.Module], bool], *roles: Role) -> Optional[fx.Node]:
    """A call of a module `kind` accepts that carries none of `roles`."""
    for node in graph.find_nodes(op="call_module"):
        if kind(called_module(node, root)) and not has_role(node, *roles):
            return node
    return None


#: the condition every pass after `insert_lora` requires, and `insert_lora` ensures
BRANCHES_INSERTED = (
    "every call of an adapted layer is tagged LAYER (or OWN) by insert_lora (or GUARDED by guard_idle_branches)"
)


def untagged_adapted_call(graph: fx.Graph, root: nn.Module) -> Optional[fx.Node]:
    """A call of an adapted layer neither `insert_lora` nor `guard_idle_branches` tagged."""
    return untagged_call(graph, root, is_adapted, Role.LAYER, Role.OWN, Role.GUARDED)


def keyword_call(graph: fx.Graph, keyword: str) -> Optional[fx.Node]:
    """A node passing `keyword`."""
    return next((n for n in graph.nodes if keyword in n.kwargs), None)


def branch_of(node: fx.Node, site: str, *roles: Role) -> bool:
    """`node` is tagged as one of `roles` of the call named `site`."""
    return has_role(node, *roles) and tag_of(node).site == site


def writes_in_place(node: fx.Node, root: nn.Module) -> bool:
    """`node` may write a tensor in place: an item assignment (``x[i] = v``), a tensor method or
    torch function named with a trailing underscore (``x.add_(y)``, ``torch.relu_(x)``), a call
    passing ``inplace=True``, or a call of a module built with ``inplace=True`` (``nn.ReLU``)."""
    if node.op == "call_module":
        return getattr(called_module(node, root), "inplace", False) is True
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target is operator.setitem or node.kwargs.get("inplace") is True:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")
