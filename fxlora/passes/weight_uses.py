"""Pass: code that an adapted layer's parent hands the layer's weight to computes with the adapted weight.

torchvision's Swin attention passes ``self.qkv.weight`` and ``self.proj.weight`` to
``shifted_window_attention`` (an opaque function in the graph) and never calls the layers, so
there is no call to put a branch after (`fxlora.passes.weight_reads` covers ``F.linear`` reads,
which a call equals). This pass replaces each use of such a layer's ``weight`` by one
``adapted_weight(layer, gates, adapters, known)`` node (`fxlora.core.weight_use`): the weight with
the adapters folded in at the call's gates, as a merge folds them, so the adapter acts, trains and
merges exactly where the weight is used. Planning only makes such graphs for adapters that are a
pure weight update (`fxlora.planning.call_checks.weight_use_targets`).

Requires: a base graph as traced, after `call_weight_reads` (no node tagged).

Guarantees: for every adapted layer the graph never calls and uses only through its ``weight``
and ``bias`` attribute reads (`fxlora.tracing.linear_reads.weight_only_layers`), and that has an
adapter whose branch runs (every adapter in gated code, the live ones in eager code of a known
state), no user reads its ``weight`` attribute node but one ``adapted_weight`` node, which
reads the layer (a ``get_attr`` of its path) and the graph's gates input. Nothing else changes.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.branch import branch_adapters
from fxlora.core.layers import target_meta
from fxlora.core.weight_use import adapted_weight, check_weight_use
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import is_adapted
from fxlora.passes.gates_input import gates_input
from fxlora.passes.tags import Role, first_tagged
from fxlora.tracing.linear_reads import weight_only_layers

__all__ = ["AdaptWeightUses", "ADAPT_WEIGHT_USES", "layers_used_by_weight"]


def layers_used_by_weight(graph: fx.Graph, root: nn.Module) -> list[str]:
    """The adapted layers a base `graph` of `root` uses only through their weight (where this
    pass gives that code the adapted weight; the root's own forward skips their adapters)."""
    return weight_only_layers(graph, root, lambda path, module: is_adapted(module))


def _weight_node(graph: fx.Graph, layer: str) -> Optional[fx.Node]:
    return next((n for n in graph.find_nodes(op="get_attr") if n.target == layer + ".weight" and n.users), None)


def _adapt(graph: fx.Graph, root: nn.Module, layer: str, ctx: PassContext) -> bool:
    """Route the uses of `layer`'s weight through `adapted_weight` (which returns the weight
    itself where no adapter of it runs); False where the graph does not read the weight."""
    module = root.get_submodule(layer)
    adapters = tuple(branch_adapters(target_meta(module), ctx.eager))
    weight = _weight_node(graph, layer)
    if weight is None:
        return False
    check_weight_use(module, adapters, layer)  # once per build, not per call
    users = list(weight.users)
    with graph.inserting_after(weight):
        holder = graph.get_attr(layer)
    with graph.inserting_after(holder):
        known = ctx.eager is not None and not ctx.eager.rows
        adapted = graph.call_function(adapted_weight, (holder, gates_input(graph), adapters, known))
    adapted.meta.update({k: weight.meta[k] for k in ("stack_trace", "nn_module_stack") if k in weight.meta})
    for user in users:
        user.replace_input_with(weight, adapted)
    graph.erase_node(weight)
    return True


def _unadapted_use(graph: fx.Graph, root: nn.Module, ctx: PassContext) -> Optional[fx.Node]:
    """A node reading, not through `adapted_weight`, the weight of an adapted layer the graph never
    calls."""
    called = {node.target for node in graph.find_nodes(op="call_module")}
    for node in graph.find_nodes(op="get_attr"):
        layer, _, leaf = node.target.rpartition(".")
        if leaf != "weight" or layer in called or not layer:
            continue
        if not is_adapted(root.get_submodule(layer)):
            continue
        stray = [u for u in node.users if u.target is not adapted_weight]
        if stray:
            return stray[0]
    return None


class AdaptWeightUses(Pass):
    """See the module docstring."""

    name = "adapt_weight_uses"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", "no node is tagged yet (a base graph as traced)", first_tagged(graph, tuple(Role)))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Adapt the weight uses; the result lists the layers, in name order."""
        layers = [layer for layer in layers_used_by_weight(graph, root) if _adapt(graph, root, layer, ctx)]
        return PassResult(self.name, tuple(layers))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("ensures", "every use of a weight-only layer's weight reads adapted_weight", _unadapted_use(graph, root, ctx))


ADAPT_WEIGHT_USES = AdaptWeightUses()
