"""Pass: calls of adapted and saved modules ask them for their base output only.

Requires: a graph after `swap_saved_modules` and `insert_lora` (the branches and copies are graph
nodes): every call of an adapted layer is tagged ``LAYER`` or ``GUARDED``, every call of a saved
module ``SAVED`` or ``COPY`` (`fxlora.passes.tags`), and no call passes ``BASE_ONLY`` yet. Every
adapted / saved module carries an eager forward (`fxlora.runtime.forwards`) that computes with LoRA when
called plainly, so that the model's other entry points get LoRA too.

Guarantees: every node tagged ``LAYER`` or ``SAVED`` passes the keyword ``BASE_ONLY=True``, and
no other node passes it: the module returns its own output and the graph adds the branch (or
selects the copy) exactly once; calls marked by `guard_idle_branches` keep their own keyword
alone. Copies and the adapters' own modules are untouched.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.layers import BASE_ONLY
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import BRANCHES_INSERTED, is_saved, keyword_call, untagged_adapted_call, untagged_call
from fxlora.passes.tags import Role, has_role, tagged

__all__ = ["MarkBaseCalls", "MARK_BASE_CALLS", "mark_base_calls"]

_BASE_CALLS = (Role.LAYER, Role.SAVED)


def _misjudged_call(graph: fx.Graph) -> Optional[fx.Node]:
    """A LAYER or SAVED node not passing ``BASE_ONLY=True``, or another node passing it."""
    for node in graph.nodes:
        marked = BASE_ONLY in node.kwargs
        if has_role(node, *_BASE_CALLS) != marked or (marked and node.kwargs[BASE_ONLY] is not True):
            return node
    return None


class MarkBaseCalls(Pass):
    """See the module docstring."""

    name = "mark_base_calls"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", BRANCHES_INSERTED, untagged_adapted_call(graph, root))
        self.check(
            "requires",
            "every call of a saved module is tagged by swap_saved_modules (SAVED)",
            untagged_call(graph, root, is_saved, Role.SAVED),
        )
        self.check("requires", f"no call passes {BASE_ONLY} yet", keyword_call(graph, BASE_ONLY))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Mark the calls; the result lists them."""
        marked = tagged(graph, *_BASE_CALLS)
        for node in marked:
            node.kwargs = {**node.kwargs, BASE_ONLY: True}
        return PassResult(self.name, tuple(node.target for node in marked))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check(
            "ensures",
            f"every LAYER and SAVED call passes {BASE_ONLY}=True, and no other node passes it",
            _misjudged_call(graph),
        )


MARK_BASE_CALLS = MarkBaseCalls()


def mark_base_calls(graph: fx.Graph, root: nn.Module) -> PassResult:
    """Run `MarkBaseCalls` (see the module docstring)."""
    return MARK_BASE_CALLS(graph, root, PassContext())
