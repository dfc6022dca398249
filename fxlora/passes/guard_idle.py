"""Pass: in gated evaluation code, each adapted layer skips its LoRA branches at run time when all
of its adapters' gates are zero (merged, disabled or inactive adapters).

Gated code (what ``torch.compile`` sees) reads the adapter state from gate tensors only, so that a
state change never recompiles; without this pass it therefore computes every branch and multiplies
it by a zero gate. With it, the layer call becomes ``layer(x, GUARD_IDLE=True)``, whose eager
forward (`fxlora.forwards.EagerLoraForward`) runs ``torch.cond(any gate open, base + branches,
base)``: a compiled model serving merged weights costs the base model's time, and still never
recompiles on a state change.

Requires: a graph before `insert_lora` and `mark_base_calls`, traced from `root` with every
adapted module a leaf; meant for evaluation code (``torch.cond`` is a forward-only construct here:
training code keeps plain branches, whose dropout and autograd it would only get in the way of).

Guarantees: every call of an adapted layer with one tensor argument and no keywords gets the
keyword ``GUARD_IDLE=True``; `insert_lora` and `mark_base_calls` leave such calls alone (the layer
computes its own branches). Other calls, and everything else in the graph, are unchanged.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..layers import GUARD_IDLE, target_meta

__all__ = ["guard_idle_branches", "is_guarded"]


def is_guarded(node: fx.Node) -> bool:
    """Whether `node` is a layer call this pass marked."""
    return node.op == "call_module" and node.kwargs.get(GUARD_IDLE, False) is True


def guard_idle_branches(graph: fx.Graph, root: nn.Module) -> int:
    """Run the pass; return the number of layer calls marked."""
    marked = 0
    for node in graph.find_nodes(op="call_module"):
        meta = target_meta(root.get_submodule(node.target))
        if meta is None or not meta.adapters or node.kwargs or len(node.args) != 1:
            continue
        if not isinstance(node.args[0], fx.Node):
            continue
        node.kwargs = {GUARD_IDLE: True}
        marked += 1
    return marked
