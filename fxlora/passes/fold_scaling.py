"""Pass: scale a branch on its rank-r side and fuse the B product with the add.

Requires: a graph rewritten by `insert_lora` (every adapted call tagged; branch outputs tagged
``ADD``, B calls ``LORA_B``, scalings ``SCALE``, `fxlora.passes.tags`), every ``scale_update``
node taking the update and two multipliers (its scaling and its gate, opaque nodes).

Guarantees: no ``add_update(base, scale_update(B(h), scaling, gate))`` branch output remains with
B a bias-free module call and each intermediate used once. With B a bias-free ``nn.Linear`` it
became one node ``add_scaled_linear(base, h, B.weight, scaling, gate)`` (an ``addmm``, tagged
``ADD``). With B a bias-free ConvNd it became ``add_update(base, B(scale_update(h, scaling,
gate)))``: the scaling multiplies r channels instead of the layer's output channels. A B with a
bias is left alone (the bias is scaled too). The values are equal up to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.ops import add_scaled_linear, add_update, scale_update
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import BRANCHES_INSERTED, untagged_adapted_call
from fxlora.passes.tags import Role, has_role, set_tag, tag_of

__all__ = ["FoldScaling", "FOLD_SCALING", "fold_scaling"]


class Foldable(NamedTuple):
    """A branch output ``out = add_update(base, scaled)``, ``scaled = scale_update(update, ...)``,
    ``update = B(h)`` with `module` the bias-free B."""

    out: fx.Node
    base: fx.Node
    scaled: fx.Node
    update: fx.Node
    module: nn.Module


def _match(out: fx.Node, root: nn.Module) -> Optional[Foldable]:
    """`out` as a `Foldable` if it is the add of one scaled bias-free B product, used once each."""
    if out.target is not add_update or not has_role(out, Role.ADD):
        return None
    base, scaled = out.args
    if not isinstance(scaled, fx.Node) or scaled.target is not scale_update or len(scaled.users) != 1:
        return None
    update = scaled.args[0]
    if not isinstance(update, fx.Node) or update.op != "call_module" or len(update.users) != 1:
        return None
    if not has_role(update, Role.LORA_B):
        return None
    module = root.get_submodule(update.target)
    if getattr(module, "bias", None) is not None:
        return None
    return Foldable(out, base, scaled, update, module)


def _fold(graph: fx.Graph, found: Foldable) -> None:
    """Replace the matched nodes by the folded ones, tagged as the nodes they replace."""
    out, base, scaled, update, module = found
    hidden = update.args[0]
    _, scaling, gate = scaled.args
    tag, adapter = tag_of(out), tag_of(update).adapter
    with graph.inserting_before(out):
        if isinstance(module, nn.Linear):
            weight = graph.get_attr(f"{update.target}.weight")
            new = graph.call_function(add_scaled_linear, (base, hidden, weight, scaling, gate))
            set_tag(weight, tag.but(Role.READ, adapter))
        else:
            scaled_hidden = graph.call_function(scale_update, (hidden, scaling, gate))
            product = graph.call_module(update.target, (scaled_hidden,))
            new = graph.call_function(add_update, (base, product))
            set_tag(scaled_hidden, tag_of(scaled))
            set_tag(product, tag_of(update))
    set_tag(new, tag)
    out.replace_all_uses_with(new)
    for dead in (out, scaled, update):
        graph.erase_node(dead)


def _odd_scale(graph: fx.Graph) -> Optional[fx.Node]:
    """A SCALE node calling `scale_update` with other than (update, scaling, gate)."""
    for node in graph.find_nodes(op="call_function", target=scale_update):
        if has_role(node, Role.SCALE) and (len(node.args) != 3 or node.kwargs):
            return node
    return None


def _foldable(graph: fx.Graph, root: nn.Module) -> Optional[fx.Node]:
    """A branch output this pass folds."""
    return next((n for n in graph.find_nodes(op="call_function", target=add_update) if _match(n, root)), None)


class FoldScaling(Pass):
    """See the module docstring."""

    name = "fold_scaling"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", BRANCHES_INSERTED, untagged_adapted_call(graph, root))
        self.check("requires", "every SCALE scale_update node takes (update, scaling, gate)", _odd_scale(graph))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Fold the branches; the result lists their layers."""
        folded = []
        for out in list(graph.find_nodes(op="call_function", target=add_update)):
            found = _match(out, root)
            if found is not None:
                folded.append(tag_of(out).layer)
                _fold(graph, found)
        return PassResult(self.name, tuple(folded))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check(
            "ensures",
            "no ADD add_update of a scale_update of a bias-free LORA_B call (each used once) remains",
            _foldable(graph, root),
        )


FOLD_SCALING = FoldScaling()


def fold_scaling(graph: fx.Graph, root: nn.Module) -> PassResult:
    """Run `FoldScaling` (see the module docstring)."""
    return FOLD_SCALING(graph, root, PassContext())
