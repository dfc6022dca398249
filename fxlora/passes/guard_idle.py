"""Pass: in gated evaluation code, each adapted layer skips its LoRA branches at run time when all
of its adapters' gates are zero (merged, disabled or inactive adapters).

Gated code (what ``torch.compile`` sees) reads the adapter state from gate tensors only, so that a
state change never recompiles; without this pass it therefore computes every branch and multiplies
it by a zero gate. With it, the layer call becomes ``layer(x, GUARD_IDLE=True)``, whose eager
forward (`fxlora.runtime.forwards.EagerLoraForward`) runs ``torch.cond(any gate open, base + branches,
base)``: a compiled model serving merged weights costs the base model's time, and still never
recompiles on a state change.

Requires: a graph before `insert_lora` and `mark_base_calls` (no adapted call tagged, no call
passing ``BASE_ONLY`` or ``GUARD_IDLE``), traced from `root` with every adapted module a leaf;
meant for evaluation code (``torch.cond`` is a forward-only construct here: training code keeps
plain branches, whose dropout and autograd it would only get in the way of).

Guarantees: every call of an adapted layer with one tensor argument and no keywords (whose kind adds
an update to the layer's output: not `fxlora.kinds.LayerKind.own_call`) gets the
keyword ``GUARD_IDLE=True`` and the tag ``GUARDED`` (`fxlora.passes.tags`); `insert_lora` and
`mark_base_calls` leave such calls alone (the layer computes its own branches). Other calls, and
everything else in the graph, are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.layers import BASE_ONLY, GUARD_IDLE, target_meta
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import is_adapted, keyword_call, not_a_leaf
from fxlora.passes.tags import BRANCH_ROLES, NodeTag, Role, first_tagged, has_role, set_tag

__all__ = ["GuardIdle", "GUARD_IDLE_BRANCHES", "guard_idle_branches", "is_guarded", "gated_evaluation"]


def is_guarded(node: fx.Node) -> bool:
    """Whether `node` is a layer call this pass marked."""
    return has_role(node, Role.GUARDED)


def gated_evaluation(ctx: PassContext) -> bool:
    """The code being built is gated (what torch.compile sees) and for evaluation."""
    return ctx.gated and not ctx.training


def _guardable(node: fx.Node, root: nn.Module) -> bool:
    """A call of a layer with adapters whose kind adds an update to its output (not `own_call`: such a
    layer computes its whole call itself), on one tensor argument, passing no other keyword."""
    if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return False
    meta = target_meta(root.get_submodule(node.target))
    return meta is not None and bool(meta.adapters) and not meta.kind.own_call and set(node.kwargs) <= {GUARD_IDLE}


def _unguarded_call(graph: fx.Graph, root: nn.Module) -> Optional[fx.Node]:
    """A guardable call left unmarked, or a GUARDED node without exactly the GUARD_IDLE keyword."""
    for node in graph.find_nodes(op="call_module"):
        if _guardable(node, root) != is_guarded(node) or (is_guarded(node) and node.kwargs != {GUARD_IDLE: True}):
            return node
    return None


class GuardIdle(Pass):
    """See the module docstring."""

    name = "guard_idle_branches"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        roles = {Role.LAYER, Role.GUARDED, *BRANCH_ROLES}
        self.check("requires", "no adapted call is tagged and no branch is inserted yet", first_tagged(graph, roles))
        self.check("requires", f"no call passes {BASE_ONLY} yet", keyword_call(graph, BASE_ONLY))
        self.check("requires", f"no call passes {GUARD_IDLE} yet", keyword_call(graph, GUARD_IDLE))
        self.check("requires", "every adapted layer is a leaf: one call_module node per call", not_a_leaf(graph, root, is_adapted))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Mark the guardable layer calls; the result lists them."""
        marked = []
        for node in graph.find_nodes(op="call_module"):
            if _guardable(node, root) and not node.kwargs:
                node.kwargs = {GUARD_IDLE: True}
                set_tag(node, NodeTag(node.target, node.name, Role.GUARDED))
                marked.append(node.target)
        return PassResult(self.name, tuple(marked))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check(
            "ensures",
            f"every call of an adapted layer on one tensor, with no other keyword, is GUARDED and passes just {GUARD_IDLE}",
            _unguarded_call(graph, root),
        )


GUARD_IDLE_BRANCHES = GuardIdle()


def guard_idle_branches(graph: fx.Graph, root: nn.Module) -> PassResult:
    """Run `GuardIdle` (see the module docstring) on gated evaluation code."""
    return GUARD_IDLE_BRANCHES(graph, root, PassContext(training=False))
