"""Layers a traced graph uses through their weight instead of calling them, and which of those uses
a graph rewrite can turn into a call of the layer, exactly.

timm's beit, eva and swinv2 attentions compute ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)``
(``qkv_bias`` a ``torch.cat`` of their own ``q_bias`` / ``k_bias`` / ``v_bias``); the graph then reads
``qkv.weight`` (a ``get_attr`` node) and never calls ``qkv``. Such a use is a *linear read* of the
layer, and is the same as a call of it, whenever the layer's call is ``F.linear(x, weight, bias)``
(an ``nn.Linear`` with torch's own forward) and the read's bias argument is the layer's own bias, or
the layer has none: then ``F.linear(x, layer.weight, b) == layer(x) + b`` (``b`` None: ``layer(x)``).

`linear_reads` finds, for each layer a graph reads, either every linear read of it, or None when
some use of the layer's tensors is anything else (a slice, a transpose, an argument of an opaque
function such as torchvision's ``shifted_window_attention``): no rewrite can then put an adapter
exactly where the weight is used.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, NamedTuple, Optional

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LinearRead", "AttributeUses", "attribute_uses", "linear_reads", "linear_arguments", "weight_only_layers", "calls_as_linear"]


class LinearRead(NamedTuple):
    """One ``F.linear`` node that reads the weight of the layer at ``layer`` (a path from the
    graph's root): its input, and the bias to add to the layer's call (None: the layer's own bias,
    or no bias)."""

    node: fx.Node
    layer: str
    input: Any
    extra_bias: Any


def linear_arguments(node: fx.Node) -> Optional[tuple[Any, Any, Any]]:
    """``(input, weight, bias)`` of an ``F.linear`` call node, positional or by keyword; None for
    any other node."""
    if node.op != "call_function" or node.target is not F.linear:
        return None
    names = ("input", "weight", "bias")
    values = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names or key in values:
            return None
        values[key] = value
    if "input" not in values or "weight" not in values:
        return None
    return values["input"], values["weight"], values.get("bias")


def calls_as_linear(module: nn.Module) -> bool:
    """Calling `module` computes ``F.linear(x, module.weight, module.bias)``."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _owner_paths(root: nn.Module, target: str, accept: Callable[[str, nn.Module], bool]) -> list[str]:
    """The paths of the accepted modules that hold the attribute `target` (or are it)."""
    parts, found, owner = target.split("."), [], root
    for i, part in enumerate(parts):
        owner = getattr(owner, part, None)
        if not isinstance(owner, nn.Module):
            break
        path = ".".join(parts[: i + 1])
        if accept(path, owner):
            found.append(path)
    return found


def _reads_of(layer: str, module: nn.Module, attrs: list[fx.Node]) -> Optional[list[LinearRead]]:
    """Every linear read of `module` (at `layer`) among the users of its attribute reads `attrs`,
    or None if one of those reads is used in any other way."""
    if not calls_as_linear(module):
        return None
    weights = {n for n in attrs if n.target == layer + ".weight"}
    biases = {n for n in attrs if n.target == layer + ".bias"}
    if len(weights) + len(biases) != len(attrs):
        return None  # the module itself, or another of its tensors, is read
    reads, bias_uses = [], 0
    for weight in weights:
        for user in weight.users:
            found = _linear_read(user, weight, layer, module, biases)
            if found is None:
                return None
            reads.append(found)
            bias_uses += found.extra_bias is None and module.bias is not None
    if bias_uses != sum(len(b.users) for b in biases):
        return None  # the bias is used somewhere else too
    return reads


def _linear_read(user: fx.Node, weight: fx.Node, layer: str, module: nn.Module, biases: set) -> Optional[LinearRead]:
    """`user` as a linear read of `weight`, or None if it is another use."""
    arguments = linear_arguments(user)
    if arguments is None:
        return None
    x, w, bias = arguments
    if w is not weight or x is weight or bias is weight or x in biases:
        return None
    if module.bias is not None:
        return LinearRead(user, layer, x, None) if bias in biases else None
    return LinearRead(user, layer, x, bias)


class AttributeUses(NamedTuple):
    """How a graph uses the tensors of the modules it reads (`attribute_uses`)."""

    #: per module read: its linear reads, or None when it is used otherwise too
    reads: dict[str, Optional[list[LinearRead]]]
    #: the `nn.Linear` modules the graph never calls and uses only through their ``weight`` (and
    #: ``bias``) attribute reads, some of them not linear reads (`weight_only_layers`)
    weight_only: list[str]


def attribute_uses(graph: fx.Graph, root: nn.Module, accept: Callable[[str, nn.Module], bool]) -> AttributeUses:
    """`linear_reads` and `weight_only_layers` of `graph`, from one walk of its attribute reads."""
    called = {node.target for node in graph.find_nodes(op="call_module")}
    reads, weight_only = {}, []
    for path, nodes in _attribute_reads(graph, root, accept).items():
        module = root.get_submodule(path)
        reads[path] = _reads_of(path, module, nodes)
        only_tensors = all(n.target in (path + ".weight", path + ".bias") for n in nodes)
        if reads[path] is None and path not in called and calls_as_linear(module) and only_tensors:
            weight_only.append(path)
    return AttributeUses(reads, sorted(weight_only))


def linear_reads(graph: fx.Graph, root: nn.Module, accept: Callable[[str, nn.Module], bool]) -> dict[str, Optional[list[LinearRead]]]:
    """For each module `accept` takes (given its path from `root`, the module `graph` was traced
    from, and the module) whose tensors `graph` reads: its linear reads, or None
    when the graph uses them otherwise too (see the module docstring). Modules the graph does not
    read are absent."""
    return attribute_uses(graph, root, accept).reads


def _attribute_reads(graph: fx.Graph, root: nn.Module, accept: Callable[[str, nn.Module], bool]) -> dict[str, list[fx.Node]]:
    """The ``get_attr`` nodes of `graph` reading each accepted module (or one of its tensors), by path."""
    attrs: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.find_nodes(op="get_attr"):
        for path in _owner_paths(root, node.target, accept):
            attrs[path].append(node)
    return attrs


def weight_only_layers(graph: fx.Graph, root: nn.Module, accept: Callable[[str, nn.Module], bool]) -> list[str]:
    """The `nn.Linear` layers `accept` takes that `graph` never calls and uses only through their
    ``weight`` (and ``bias``) attribute reads, some of them not linear reads: their parent hands
    the tensors to code no call equals (torchvision's ``shifted_window_attention(x,
    self.qkv.weight, ..., qkv_bias=self.qkv.bias)``). `fxlora.passes.weight_uses` gives such
    code the adapted weight."""
    return attribute_uses(graph, root, accept).weight_only
