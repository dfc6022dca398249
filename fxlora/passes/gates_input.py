"""The graph input through which rewritten code receives the call's adapter gates.

Generated code is called as ``forward(self, gates, *inputs)`` (`fxlora.runtime.forwards.GraphForward`):
``gates`` is the call's `fxlora.core.gates.GateState`, and every branch and copy selection reads its
adapter's gate from it (`fxlora.core.ops.adapter_gate`, `select_gate`, `eager_factor`), never from
model-wide state.
"""

from __future__ import annotations

import torch.fx as fx

__all__ = ["GATES_INPUT", "gates_input"]

#: name of the placeholder, and the ``node.meta`` tag that marks it
GATES_INPUT = "_fxlora_gates"


def gates_input(graph: fx.Graph) -> fx.Node:
    """The gates placeholder of `graph`, created as its first input if it has none yet."""
    for node in graph.find_nodes(op="placeholder"):
        if node.meta.get(GATES_INPUT):
            return node
    with graph.inserting_before(next(iter(graph.nodes))):
        node = graph.placeholder(GATES_INPUT)
    node.meta[GATES_INPUT] = True
    return node
