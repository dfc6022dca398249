"""Pass: insert each adapted layer's LoRA branch after the layer's node.

Requires: `graph` was traced from `root` with every adapted module (one carrying
`fxlora.layers.TargetMeta`) as a leaf, so each call of such a module is one ``call_module`` node
whose target is the module's path from `root`.

Guarantees: for every such node ``N = layer(x)``, every former user of N now reads
``lora_output(layer, x, N, live)`` (`fxlora.branch`; with ``live`` given, layers where none of
those adapters sits keep their plain node): the branch's nodes (dropout as a call of the
``nn.Dropout`` module, A, B, the scaling tensor, the gate tensor and the add), traced from that
function and spliced right after N (in eager code of a mixed batch, a linear layer's branch is
one ``stacked_layer_update`` node, handed the layer itself by a ``get_attr`` of its path). Adapter
modules are called by their paths (``<layer>.lora_A.<adapter>`` ...); every inserted node has
``meta["fxlora_target"]`` set to the layer's path. Calls marked by `guard_idle_branches` are left alone (the layer computes its own
branches). Nothing else in the graph changes.
"""

from __future__ import annotations

import functools
from typing import Hashable, Optional

import torch.fx as fx
import torch.nn as nn

from ..branch import branch_adapters, lora_output
from ..gates import EagerKey
from ..layers import TargetMeta, target_meta
from ..tracing import LoraTracer
from .gates_input import gates_input
from .guard_idle import is_guarded

__all__ = ["insert_lora", "branch_template", "splice", "first_input", "nodes_between"]


class _BranchHost(nn.Module):
    """Lets fx trace `lora_output` with module paths relative to the adapted layer; the call's
    gates and the adapters' scalings are inputs of the template (bound when it is spliced)."""

    def __init__(self, layer: nn.Module, eager: Optional[EagerKey], adapters: list[str]) -> None:
        super().__init__()
        self.layer = layer
        self.eager = eager
        self.adapters = adapters

    def branch(self, x, base, gates, scalings: tuple):
        return lora_output(self.layer, x, base, gates, self.eager, dict(zip(self.adapters, scalings)))


@functools.lru_cache(maxsize=None)
def _host_class(count: int) -> type:
    """A `_BranchHost` whose ``forward`` takes `count` scalings as named inputs (fx gives a
    ``*args`` input one placeholder, which cannot be bound to separate values)."""
    names = [f"scaling_{i}" for i in range(count)]
    source = f"def forward(self, x, base, gates{''.join(', ' + n for n in names)}):\n"
    source += f"    return self.branch(x, base, gates, ({''.join(n + ', ' for n in names)}))\n"
    namespace: dict = {}
    exec(source, namespace)
    return type(f"_BranchHost{count}", (_BranchHost,), {"forward": namespace["forward"]})


def _template_key(module: nn.Module, meta: TargetMeta, eager: Optional[EagerKey]) -> Hashable:
    """Everything `lora_output` reads as Python values (the graph it traces depends on nothing
    else): layer kind, the adapters whose branch runs and their options, the layer options its
    kind's update reads, and which kind of code (gated, a known state, a mixed batch). No
    numbers: scalings are inputs."""
    adapters = tuple(
        (name, spec.variant, spec.lora_bias, spec.dropout > 0)
        for name, spec in ((name, meta.adapters[name]) for name in branch_adapters(meta, eager))
    )
    mode = None if eager is None else eager.rows
    return (meta.kind, adapters, meta.kind.template_key(module), mode)


_TEMPLATES: dict[Hashable, fx.Graph] = {}  # traced once per process; templates hold no module or number


def branch_template(module: nn.Module, eager: Optional[EagerKey] = None) -> fx.Graph:
    """`lora_output(module, x, base, gates, eager, scalings)` as a graph with placeholders (x, base,
    gates, one scaling per adapter whose branch runs) and node targets relative to `module` (""
    for the layer itself, handed to an op)."""
    adapters = branch_adapters(target_meta(module), eager)
    host = _host_class(len(adapters))(module, eager, adapters)
    graph = LoraTracer({id(host)}).trace(host)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            if node.target != "layer" and not node.target.startswith("layer."):
                raise RuntimeError(f"internal error: the LoRA branch reads {node.target!r}, outside the layer")
            node.target = node.target.removeprefix("layer").removeprefix(".")
    return graph


def splice(graph: fx.Graph, template: fx.Graph, prefix: str, inputs: list, tag: str) -> object:
    """Copy `template`'s nodes into `graph` at the current insertion point, binding its
    placeholders to `inputs` and prefixing module/attribute targets (`prefix` ends with a dot; a
    target "" names the module `prefix` itself); return the output value."""
    env: dict[fx.Node, object] = {}
    placeholders = [n for n in template.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs))
    for node in template.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            return fx.map_arg(node.args[0], lambda n: env[n])
        target = (prefix + node.target).rstrip(".") if node.op in ("call_module", "get_attr") else node.target
        args = fx.map_arg(node.args, lambda n: env[n])
        kwargs = fx.map_arg(node.kwargs, lambda n: env[n])
        new = graph.create_node(node.op, target, args, kwargs, type_expr=node.type)
        new.meta["fxlora_target"] = tag
        env[node] = new
    raise ValueError("template graph has no output")


def first_input(node: fx.Node) -> fx.Node:
    """The tensor a layer call consumes: its first positional argument, else its first keyword."""
    if node.args:
        return node.args[0]
    if node.kwargs:
        return next(iter(node.kwargs.values()))
    raise ValueError(f"call of {node.target} has no input")


def nodes_between(first: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """The nodes from `first` up to (not including) `stop`, in graph order."""
    found, node = set(), first
    while node is not stop:
        found.add(node)
        node = node.next
    return found


def insert_lora(graph: fx.Graph, root: nn.Module, eager: Optional[EagerKey] = None) -> int:
    """Run the pass; return the number of layer calls that received a branch. With `eager`, only
    the live adapters' branches are inserted (eager code for a kind of adapter state)."""
    count = 0
    for node in list(graph.find_nodes(op="call_module")):
        module = root.get_submodule(node.target)
        meta = target_meta(module)
        if meta is None or not meta.adapters or is_guarded(node):
            continue
        key = _template_key(module, meta, eager)
        if not key[1]:
            continue  # no branch runs on this layer
        if key not in _TEMPLATES:
            _TEMPLATES[key] = branch_template(module, eager)
        scalings = [meta.adapters[name].scaling for name, *_ in key[1]]
        following = node.next
        with graph.inserting_before(following):
            inputs = [first_input(node), node, gates_input(graph), *scalings]
            out = splice(graph, _TEMPLATES[key], node.target + ".", inputs, node.target)
        if out is not node:
            inserted = nodes_between(node.next, following)
            node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)
        count += 1
    return count
