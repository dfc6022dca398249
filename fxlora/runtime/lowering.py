"""Lowering rewritten graphs to the code that runs: base-only layer calls become direct calls of
the layer class's ``forward``.

The passes (`fxlora.passes`) leave each adapted (or saved) layer as a ``call_module`` node passing
``BASE_ONLY=True``: through the layer's ``__call__`` and its installed forward, which returns the
base output. Run as is, every such call pays ``nn.Module.__call__`` and the installed forward's
dispatch, and under ``torch.compile`` each layer's installed forward object is guarded by
identity, so identical blocks cannot share compiled code. `lower_base_calls` replaces each such
node by ``base_forward(layer, *args)``: the class's own ``forward``, the same function the
installed forward would have called.

Requires: the layer's ``__call__`` would do nothing but call its forward — no hooks on it (a call
whose layers have hooks runs the root's own forward instead:
`fxlora.tracing.boundaries.LeafHooks`) — and its installed forward replaced no earlier instance
forward (such layers keep their ``call_module`` node).
Guarantees: the graph computes the same values; no node passes ``BASE_ONLY``.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from fxlora.core.layers import BASE_ONLY

__all__ = ["base_forward", "lower_base_calls"]


@fx.wrap
def base_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``type(module).forward(module, *args, **kwargs)``: the layer's own computation."""
    return type(module).forward(module, *args, **kwargs)


def lower_base_calls(graph: fx.Graph, root: nn.Module) -> fx.Graph:
    """Replace, in place, every base-only ``call_module`` node of a layer without an earlier
    instance forward by a ``base_forward`` call (see the module docstring). Returns `graph`."""
    for node in list(graph.find_nodes(op="call_module")):
        if not node.kwargs.get(BASE_ONLY):
            continue
        installed = root.get_submodule(node.target).__dict__.get("forward")
        if getattr(installed, "previous", None) is not None:
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k != BASE_ONLY}
        with graph.inserting_before(node):
            module = graph.get_attr(node.target)
            call = graph.call_function(base_forward, (module, *node.args), kwargs)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    return graph
