"""Pass: make each `modules_to_save` module's node compute with its trainable copies.

Requires: every module carrying `fxlora.layers.SavedMeta` is a leaf of `graph` (one
``call_module`` node per call, target = its path from `root`).

Guarantees: for every such node ``N = module(*args, **kwargs)`` and every adapter owning a copy,
in order, a node calls ``<module>.modules_to_save.<adapter>`` with the same arguments and
``select_output(select_gate(gates, adapter, copy), copy, previous)`` picks it wherever the call's
select gate is set (`fxlora.branch.saved_output` computes the same eagerly). Former users of N read the last
selection. The original module is still called: it is what a disabled adapter computes. With
``chosen`` given instead, the node calls just the selected copy (or stays the original's call).
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from ..layers import saved_meta
from ..ops import select_gate, select_output
from .gates_input import gates_input

__all__ = ["swap_saved_modules"]


def swap_saved_modules(graph: fx.Graph, root: nn.Module, chosen: Optional[tuple[str, ...]] = None) -> int:
    """Run the pass; return the number of module calls rewired. With `chosen` (the adapters whose
    copies are selected, known in Python: eager code for a known state) a node simply calls the
    copy that is used, or stays the original's call when none is."""
    count = 0
    for node in list(graph.find_nodes(op="call_module")):
        meta = saved_meta(root.get_submodule(node.target))
        if meta is None or not meta.adapters:
            continue
        if chosen is not None:
            picked = [a for a in meta.adapters if a in chosen]
            if picked:
                node.target = f"{node.target}.modules_to_save.{picked[-1]}"
                node.meta["fxlora_target"] = node.target
                count += 1
            continue
        inserted = []
        with graph.inserting_before(node.next):
            out = node
            for adapter in meta.adapters:
                copy = graph.call_module(f"{node.target}.modules_to_save.{adapter}", node.args, node.kwargs)
                gate = graph.call_function(select_gate, (gates_input(graph), adapter, copy))
                out = graph.call_function(select_output, (gate, copy, out))
                inserted += [copy, gate, out]
        for new in inserted:
            new.meta["fxlora_target"] = node.target
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)
        count += 1
    return count
