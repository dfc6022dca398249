"""Pass: layers that read the same input compute their A products together.

Requires: a graph rewritten by `insert_lora` and `skip_dropout` (so an A node reads
``cast_like(x, A.weight)`` directly).

Guarantees: for each input node ``x`` and adapter name, when two or more branches call their
``lora_A.<adapter>`` (bias-free ``nn.Linear``) on ``cast_like(x, ...)``, those A calls become one
``shared_low_rank(x, [A_1.weight, A_2.weight, ...])`` node (one matmul on the concatenated weights)
and ``getitem`` nodes that hand each branch its slice. Branches with dropout (p > 0) keep their own
A call: their inputs differ. Values are equal up to float rounding.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch.fx as fx
import torch.nn as nn

from ..ops import cast_like, shared_low_rank

__all__ = ["share_lora_a"]


def _group_key(node: fx.Node, root: nn.Module):
    """(input node, adapter, dtype) for an A call that reads ``cast_like(x, ...)``, else None."""
    if "fxlora_target" not in node.meta or ".lora_A." not in f".{node.target}":
        return None
    module = root.get_submodule(node.target)
    if not isinstance(module, nn.Linear) or module.bias is not None or len(node.args) != 1:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.target is not cast_like:
        return None
    adapter = node.target.rsplit(".", 1)[-1]
    return source.args[0], adapter, module.weight.dtype


def _erase_if_dead(graph: fx.Graph, node: fx.Node) -> None:
    if not node.users:
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        for a in inputs:
            if a.op in ("get_attr", "call_function") and "fxlora_target" in a.meta:
                _erase_if_dead(graph, a)


def share_lora_a(graph: fx.Graph, root: nn.Module) -> int:
    """Run the pass; return the number of A calls merged into shared ones."""
    groups: dict = defaultdict(list)
    for node in graph.find_nodes(op="call_module"):
        key = _group_key(node, root)
        if key is not None:
            groups[key].append(node)
    merged = 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for (x, _, _), calls in groups.items():
        if len(calls) < 2:
            continue
        calls.sort(key=order.__getitem__)
        with graph.inserting_before(calls[0]):
            weights = [graph.get_attr(f"{c.target}.weight") for c in calls]
            shared = graph.call_function(shared_low_rank, (x, weights))
            parts = [graph.call_function(operator.getitem, (shared, i)) for i in range(len(calls))]
        for node in [*weights, shared, *parts]:
            node.meta["fxlora_target"] = calls[0].meta["fxlora_target"]
        for call, part in zip(calls, parts):
            call.replace_all_uses_with(part)
            source = call.args[0]
            graph.erase_node(call)
            _erase_if_dead(graph, source)
        merged += len(calls)
    return merged
