"""Where the batch rows of an own-call layer's input come from (`fxlora.core.own_rows`).

A layer whose kind computes its adapted call itself (`fxlora.kinds.LayerKind.own_call`) serves a
mixed batch entry by entry along dim 0 of its first input, and must know the row of each entry
exactly. transformers' sparse-MoE blocks hand their router and experts tokens, not rows:
``hidden_states.view(-1, hidden)`` of a (batch, seq, hidden) input. A row-major reshape keeps the
order of the elements, so entry t of the result belongs to row ``t // (N / batch)`` of the tensor it
was reshaped from, whatever the shapes (if the batch divides N, checked at run time). Only such
reshapes qualify: ``view`` / ``reshape`` to a shape, ``flatten``, ``contiguous``; a permute,
transpose, indexing or any other op on the way moves elements, so the walk stops there, and that
op's output is taken as the batch-first tensor (which the mixed-batch layout check, row 0 alone,
then verifies: its dim 0 must be the batch's).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxlora.core.own_rows import ROWS_OF

__all__ = ["batch_source", "pass_rows_source"]

_METHODS = frozenset({"view", "reshape", "flatten", "contiguous"})
_FUNCTIONS = frozenset({torch.reshape, torch.flatten})


def _order_preserving(node: fx.Node) -> bool:
    """A row-major reshape of its first argument (a ``view`` to a dtype reinterprets bytes: not one)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method" and node.target in _METHODS:
        return not any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values()))
    return node.op == "call_function" and node.target in _FUNCTIONS


def batch_source(value: object) -> Optional[fx.Node]:
    """The node that `value` (a layer call's first input) is a chain of row-major reshapes of, or
    None if `value` is not a reshape (its own dim 0 is then the batch) or not a node."""
    if not isinstance(value, fx.Node) or not _order_preserving(value):
        return None
    node = value
    while _order_preserving(node):
        node = node.args[0]
    return node


def pass_rows_source(node: fx.Node, first: object) -> None:
    """Make the layer call `node` pass `ROWS_OF` = the batch-first tensor its first input `first`
    was reshaped from, where there is one (`batch_source`)."""
    source = batch_source(first)
    if source is not None:
        node.kwargs = {**node.kwargs, ROWS_OF: source}
