"""Pass: calls of adapted and saved modules ask them for their base output only.

Requires: a graph after `swap_saved_modules` and `insert_lora` (the branches and copies are graph
nodes). Every adapted / saved module carries an eager forward (`fxlora.forwards`) that computes with
LoRA when called plainly, so that the model's other entry points get LoRA too.

Guarantees: every ``call_module`` node whose module carries fxlora's record gets the keyword
``BASE_ONLY=True``: the module returns its own output and the graph adds the branch (or selects the
copy) exactly once; calls marked by `guard_idle_branches` keep their own keyword. Copies and the adapters' own modules are untouched.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..layers import BASE_ONLY, saved_meta, target_meta
from .guard_idle import is_guarded

__all__ = ["mark_base_calls"]


def mark_base_calls(graph: fx.Graph, root: nn.Module) -> int:
    """Run the pass; return the number of calls marked."""
    marked = 0
    for node in graph.find_nodes(op="call_module"):
        if is_guarded(node):
            continue
        module = root.get_submodule(node.target)
        if target_meta(module) is not None or saved_meta(module) is not None:
            node.kwargs = {**node.kwargs, BASE_ONLY: True}
            marked += 1
    return marked
