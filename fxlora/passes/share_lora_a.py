"""Pass: layers that read the same input compute their A products together.

Requires: a graph rewritten by `insert_lora` (every adapted call tagged; A calls tagged
``LORA_A`` with their adapter, `fxlora.passes.tags`), every ``LORA_A`` node a call of a module or
a slice of a ``SHARED_A`` node. It finds something to share once `skip_dropout` ran (then an A
call of a branch without dropout reads ``cast_like(x, A.weight)`` directly).

Guarantees: at most one A product per group, a group being an input node ``x``, an adapter name
and a dtype: when two or more branches called their A (a bias-free ``nn.Linear``, tagged
``LORA_A`` of that adapter) on ``cast_like(x, ...)``, those calls became one
``shared_low_rank(x, [A_1.weight, A_2.weight, ...])`` node (``SHARED_A``: one matmul on the
concatenated weights) and ``getitem`` nodes (``LORA_A`` of each call's layer) that hand each
branch its slice; calls with an in-place write between them (``x[i] = v``, ``x.add_(y)``,
``inplace=True``: `fxlora.passes.conditions.writes_in_place`) are in different groups. Branches with dropout (p > 0) keep their own A call: their inputs differ.
Values are equal up to float rounding.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Hashable, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.dtypes import cast_like
from fxlora.core.ops import shared_low_rank
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import BRANCHES_INSERTED, untagged_adapted_call, writes_in_place
from fxlora.passes.tags import Role, has_role, set_tag, tag_of, tagged

__all__ = ["ShareLoraA", "SHARE_LORA_A", "share_lora_a"]


def _group_key(node: fx.Node, root: nn.Module) -> Optional[Hashable]:
    """(input node, adapter, dtype) for an A call that reads ``cast_like(x, ...)``, else None."""
    if node.op != "call_module" or not has_role(node, Role.LORA_A):
        return None
    module = root.get_submodule(node.target)
    if not isinstance(module, nn.Linear) or module.bias is not None or len(node.args) != 1:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.target is not cast_like:
        return None
    return source.args[0], tag_of(node).adapter, module.weight.dtype


def _groups(graph: fx.Graph, root: nn.Module) -> dict[Hashable, list[fx.Node]]:
    """The A calls of each group. A call after an in-place write (to any tensor: it may be a
    view of the input) is never grouped with one before it, so no call reads a stale product."""
    groups: dict[Hashable, list[fx.Node]] = defaultdict(list)
    writes = 0
    for node in graph.nodes:
        if writes_in_place(node, root):
            writes += 1
        elif node.op == "call_module":
            key = _group_key(node, root)
            if key is not None:
                groups[(*key, writes)].append(node)
    return groups


def _erase_if_dead(graph: fx.Graph, node: fx.Node) -> None:
    if not node.users:
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        for a in inputs:
            if a.op in ("get_attr", "call_function") and tag_of(a) is not None:
                _erase_if_dead(graph, a)


def _share(graph: fx.Graph, x: fx.Node, calls: list[fx.Node]) -> None:
    """Replace the A `calls` on `x` (in graph order) by one shared product and its slices."""
    with graph.inserting_before(calls[0]):
        weights = [graph.get_attr(f"{c.target}.weight") for c in calls]
        shared = graph.call_function(shared_low_rank, (x, weights))
        parts = [graph.call_function(operator.getitem, (shared, i)) for i in range(len(calls))]
    first = tag_of(calls[0])
    set_tag(shared, first.but(Role.SHARED_A, first.adapter))
    for call, weight, part in zip(calls, weights, parts):
        tag = tag_of(call)
        set_tag(weight, tag.but(Role.READ, tag.adapter))
        set_tag(part, tag)
        call.replace_all_uses_with(part)
        source = call.args[0]
        graph.erase_node(call)
        _erase_if_dead(graph, source)


def _unshared_call(graph: fx.Graph, root: nn.Module) -> Optional[fx.Node]:
    """The second A call of a group that still has several."""
    return next((calls[1] for calls in _groups(graph, root).values() if len(calls) > 1), None)


def _odd_a_node(graph: fx.Graph) -> Optional[fx.Node]:
    """A LORA_A node that is neither a module call nor a slice of a SHARED_A node."""
    for node in tagged(graph, Role.LORA_A):
        sliced = node.target is operator.getitem and has_role(node.args[0], Role.SHARED_A)
        if node.op != "call_module" and not sliced:
            return node
    return None


class ShareLoraA(Pass):
    """See the module docstring."""

    name = "share_lora_a"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", BRANCHES_INSERTED, untagged_adapted_call(graph, root))
        self.check("requires", "every LORA_A node is a module call or a slice of a SHARED_A node", _odd_a_node(graph))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Share the A products; the result lists the layers whose A call joined a shared one."""
        shared = []
        order = {node: i for i, node in enumerate(graph.nodes)}
        for (x, *_), calls in _groups(graph, root).items():
            if len(calls) < 2:
                continue
            calls.sort(key=order.__getitem__)
            shared += [tag_of(c).layer for c in calls]
            _share(graph, x, calls)
        return PassResult(self.name, tuple(shared))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check(
            "ensures",
            "at most one A call per (input, adapter, dtype) among bias-free linear A calls on cast_like(input)",
            _unshared_call(graph, root),
        )
        self.check("ensures", "every LORA_A node is a module call or a slice of a SHARED_A node", _odd_a_node(graph))


SHARE_LORA_A = ShareLoraA()


def share_lora_a(graph: fx.Graph, root: nn.Module) -> PassResult:
    """Run `ShareLoraA` (see the module docstring)."""
    return SHARE_LORA_A(graph, root, PassContext())
