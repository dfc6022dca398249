"""Lowering rewritten graphs to the code that runs: base-only layer calls become direct calls of
the layer class's ``forward``.

The passes (`fxlora.passes`) leave each adapted (or saved) layer as a ``call_module`` node passing
``BASE_ONLY=True``: through the layer's ``__call__`` and its installed forward, which returns the
base output. Run as is, every such call pays ``nn.Module.__call__`` and the installed forward's
dispatch, and under ``torch.compile`` each layer's installed forward object is guarded by
identity, so identical blocks cannot share compiled code. `lower_base_calls` replaces each such
node by ``base_forward(layer, *args)``: the class's own ``forward``, the same function the
installed forward would have called. A layer whose class computes with ``nn.Linear.forward``
(plain ``nn.Linear``, or a subclass keeping its forward) called with its input alone becomes that
forward's one op, ``F.linear(x, layer.weight, layer.bias)``, its tensors read when the code runs
(one Python frame less per layer in eager code, where the time between two GEMMs counts).

Requires: the layer's ``__call__`` would do nothing but call its forward — no hooks on it (a call
whose layers have hooks runs the root's own forward instead:
`fxlora.tracing.boundaries.BaseLayers`) — and its installed forward replaced no earlier instance
forward and still has it (other layers keep their ``call_module`` node).
Guarantees: the graph computes the same values; no node passes ``BASE_ONLY``.
"""

from __future__ import annotations

from typing import Any, Collection, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxlora.core.layers import BASE_ONLY, NESTED_CODE
from fxlora.passes.conditions import called_module
from fxlora.passes.gates_input import gates_input
from fxlora.tracing.linear_reads import calls_as_linear

__all__ = ["base_forward", "lower_base_calls", "mark_nested_calls"]


@fx.wrap
def base_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``type(module).forward(module, *args, **kwargs)``: the layer's own computation."""
    return type(module).forward(module, *args, **kwargs)


def lower_base_calls(graph: fx.Graph, root: nn.Module, lowerable: Collection[nn.Module]) -> fx.Graph:
    """Replace, in place, every base-only ``call_module`` node of a layer in `lowerable` (those
    meeting the requirements above) by a ``base_forward`` call. Returns `graph`."""
    ids = {id(m) for m in lowerable}
    for node in list(graph.find_nodes(op="call_module")):
        layer = called_module(node, root)
        if not node.kwargs.get(BASE_ONLY) or id(layer) not in ids:
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k != BASE_ONLY}
        with graph.inserting_before(node):
            call = _lowered_call(graph, node.target, layer, node.args, kwargs)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    return graph


def _lowered_call(graph: fx.Graph, target: str, layer: nn.Module, args: tuple, kwargs: dict) -> fx.Node:
    """The node computing `layer`'s own forward on `args`: ``F.linear`` for a layer computing as
    ``nn.Linear`` does, else ``base_forward``."""
    if calls_as_linear(layer) and len(args) == 1 and not kwargs:
        weight, bias = graph.get_attr(f"{target}.weight"), graph.get_attr(f"{target}.bias")
        return graph.call_function(F.linear, (args[0], weight, bias))
    return graph.call_function(base_forward, (graph.get_attr(target), *args), kwargs)


def code_when_compiling(code: str, gates: Any) -> Optional[tuple[str, Any]]:
    """``(code, gates)`` under torch.compile, else None (eager code leaves each nested root to
    choose its own code, with the gates of the call in flight)."""
    return (code, gates) if torch.compiler.is_compiling() else None


def mark_nested_calls(graph: fx.Graph, targets: Collection[str], code: Optional[str]) -> fx.Graph:
    """Make, in place, every ``call_module`` node of `targets` (graph roots of their own) pass
    ``NESTED_CODE``: under torch.compile `code`, which of their codes they run inside this code's
    branch of its ``torch.cond`` (`fxlora.runtime.idle.run_gated`), and this code's gates (the
    branch's own input, not state read inside it); else None (they choose).
    Every code of a root passes it, so that a root compiled on its own sees one set of keywords.
    Returns `graph`."""
    wanted = set(targets)
    for node in list(graph.find_nodes(op="call_module")):
        if node.target in wanted:
            told: Any = None
            if code is not None:
                with graph.inserting_before(node):
                    told = graph.call_function(code_when_compiling, (code, gates_input(graph)))
            node.kwargs = {**node.kwargs, NESTED_CODE: told}
    return graph
