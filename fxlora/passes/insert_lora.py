"""Pass: insert each adapted layer's LoRA branch after the layer's node.

Requires: `graph` was traced from `root` with every adapted module (one carrying
`fxlora.core.layers.TargetMeta`) as a leaf, so each call of such a module is one ``call_module`` node
whose target is the module's path from `root`; no branch is inserted yet and no call asks for its
base output yet (`mark_base_calls` runs after).

Guarantees: every call of an adapted layer not marked by `guard_idle_branches` is tagged ``LAYER``
(`fxlora.passes.tags`). For every such node ``N = layer(x)`` with a branch to run, every former
user of N now reads ``lora_output(layer, x, N, gates, eager)`` (`fxlora.core.branch`; for eager code
of a known state, layers where no live adapter sits keep their plain node and get no branch
node): the branch's nodes (dropout as a call of the ``nn.Dropout`` module, A, B, the gate read
from the graph's gates input (`gates_input`), the scaling as a number, the add), traced from that function and spliced right after N (in eager code of a mixed batch, a
linear layer's branch is one ``stacked_layer_update`` node, handed the layer itself by a
``get_attr`` of its path), and N's only users are its branch's nodes. Every inserted node is
tagged with the layer's path, N's name as its site, its role (`fxlora.passes.branch_parts`, one
``ADD`` node: the branch output) and its adapter. Calls marked by `guard_idle_branches` are left
alone (the layer computes its own branches). A call of a layer whose kind computes its adapted call
itself (`fxlora.kinds.LayerKind.own_call`) is tagged ``OWN`` and still calls the layer, passing the
keyword `fxlora.core.own_rows.ROWS_OF` where its first input is a row-major reshape of another
tensor (`fxlora.passes.rows_source`; under torch.compile any code, the base code of
`fxlora.runtime.idle` included, may meet a mixed batch's row gates). Nothing else in the graph changes.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Hashable, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.branch import branch_adapters, lora_output
from fxlora.core.gates import EagerKey
from fxlora.core.layers import BASE_ONLY, TargetMeta, target_meta
from fxlora.tracing.tracer import LoraTracer
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.branch_parts import PART, BranchPart, label_template
from fxlora.passes.conditions import (
    BRANCHES_INSERTED,
    branch_of,
    called_module,
    is_adapted,
    keyword_call,
    not_a_leaf,
    untagged_adapted_call,
)
from fxlora.passes.gates_input import gates_input
from fxlora.passes.guard_idle import is_guarded
from fxlora.passes.rows_source import pass_rows_source
from fxlora.passes.tags import BRANCH_ROLES, NodeTag, Role, first_tagged, has_role, set_tag, tag_of, tagged

__all__ = ["InsertLora", "INSERT_LORA", "insert_lora", "branch_template", "splice", "first_input", "nodes_between"]


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
    numbers: scalings are inputs (gated code reads a hot-swap slot's from its tensor)."""
    adapters = tuple(
        (name, spec.variant, spec.lora_bias, spec.dropout > 0, spec.scaling_cell is not None)
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
    label_template(graph, host, module)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            if node.target != "layer" and not node.target.startswith("layer."):
                raise RuntimeError(f"internal error: the LoRA branch reads {node.target!r}, outside the layer")
            node.target = node.target.removeprefix("layer").removeprefix(".")
    return graph


def splice(graph: fx.Graph, template: fx.Graph, prefix: str, inputs: list, site: NodeTag) -> object:
    """Copy `template`'s nodes into `graph` at the current insertion point, binding its
    placeholders to `inputs` and prefixing module/attribute targets (`prefix` ends with a dot; a
    target "" names the module `prefix` itself); tag each copy as its template node's part of
    `site`'s branch; return the output value."""
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
        part = node.meta.get(PART, BranchPart(Role.BRANCH))
        set_tag(new, site.but(part.role, part.adapter))
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


def _insert_branch(graph: fx.Graph, node: fx.Node, key: Hashable, meta: TargetMeta, site: NodeTag) -> None:
    """Splice the branch of template `key` after the layer call `node` (its inputs: the layer's
    input and output, the graph's gates input and the adapters' scalings); its users read the
    output."""
    following = node.next
    with graph.inserting_before(following):
        scalings = [meta.adapters[name].scaling for name, *_ in key[1]]
        inputs = [first_input(node), node, gates_input(graph), *scalings]
        out = splice(graph, _TEMPLATES[key], node.target + ".", inputs, site)
    if out is not node:
        inserted = nodes_between(node.next, following)
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)


def _misbranched_call(graph: fx.Graph, root: nn.Module, eager: Optional[EagerKey]) -> Optional[fx.Node]:
    """A ``LAYER`` call that has branch nodes though no adapter of it runs, or that runs one but
    lacks a single ``ADD`` node or feeds a node outside its branch."""
    sites: dict[str, list[fx.Node]] = defaultdict(list)
    for node in tagged(graph, *BRANCH_ROLES):
        sites[tag_of(node).site].append(node)
    for node in tagged(graph, Role.LAYER):
        module = root.get_submodule(node.target)
        meta = target_meta(module)
        own = sites.get(node.name, [])
        if not meta.adapters or not branch_adapters(meta, eager):
            if own:
                return node
            continue
        adds = [n for n in own if has_role(n, Role.ADD)]
        if len(adds) != 1 or not all(branch_of(user, node.name, *BRANCH_ROLES) for user in node.users):
            return node
    return None


class InsertLora(Pass):
    """See the module docstring."""

    name = "insert_lora"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", "no LoRA branch is inserted yet", first_tagged(graph, {Role.LAYER, *BRANCH_ROLES}))
        self.check("requires", "every adapted layer is a leaf: one call_module node per call", not_a_leaf(graph, root, is_adapted))
        self.check("requires", f"no call passes {BASE_ONLY} yet", keyword_call(graph, BASE_ONLY))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Insert the branches; the result lists the layer calls that received one. With
        ``ctx.eager`` of a known state, only the live adapters' branches are inserted."""
        sites = []
        for node in list(graph.find_nodes(op="call_module")):
            module = called_module(node, root)
            meta = target_meta(module)
            if meta is None or is_guarded(node):
                continue
            if meta.kind.own_call:  # called plainly: its eager forward computes the adapted call
                set_tag(node, NodeTag(node.target, node.name, Role.OWN))
                pass_rows_source(node, first_input(node))  # under compile any code may meet row gates
                continue
            site = NodeTag(node.target, node.name, Role.LAYER)
            set_tag(node, site)
            if not meta.adapters:
                continue
            key = _template_key(module, meta, ctx.eager)
            if not key[1]:
                continue  # no branch runs on this layer
            if key not in _TEMPLATES:
                _TEMPLATES[key] = branch_template(module, ctx.eager)
            _insert_branch(graph, node, key, meta, site)
            sites.append(node.target)
        return PassResult(self.name, tuple(sites))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("ensures", BRANCHES_INSERTED, untagged_adapted_call(graph, root))
        self.check(
            "ensures",
            "every adapted call with a live adapter feeds only its own branch, which has one ADD output; "
            "every other adapted call has no branch",
            _misbranched_call(graph, root, ctx.eager),
        )


INSERT_LORA = InsertLora()


def insert_lora(graph: fx.Graph, root: nn.Module, eager: Optional[EagerKey] = None) -> PassResult:
    """Run `InsertLora` (see the module docstring) for code of kind `eager` (None: gated code)."""
    return INSERT_LORA(graph, root, PassContext(eager=eager))
