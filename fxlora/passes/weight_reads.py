"""Pass: an adapted layer that its parent uses through its weight is called where the weight is used.

timm's beit, eva and swinv2 attentions compute ``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)``
and never call ``qkv``: no module swap reaches that use (PEFT's adapters there do nothing). In the
graph it is one ``F.linear`` node reading ``qkv.weight``, a *linear read*
(`fxlora.tracing.linear_reads`), which this pass replaces by the call it equals, ``qkv(x)`` (plus
the read's bias, where that is not the layer's own: ``qkv(x) + qkv_bias``). The later passes then
see an ordinary call of an adapted layer, so the adapter acts there exactly as on a layer its
parent calls with the same input: the same branch (dropout, scaling, gates for ``set_adapter``,
``disable_adapter`` and mixed batches, DoRA), the same training, and a merge folded into
``qkv.weight`` is what the call computes with afterwards. A `modules_to_save` ``nn.Linear`` read
this way is called in the same way, so that its trainable copies are selected there too.

Requires: a base graph as traced (no node tagged, no call passing ``BASE_ONLY``).

Guarantees: no adapted or saved layer has a linear read left: each former ``F.linear`` node's users read a
``call_module`` node of the layer on the read's input (followed by an add of the read's bias,
where that is not the layer's own), which copies the read's ``stack_trace`` / ``nn_module_stack``;
the attribute reads nothing else uses are gone. A layer the graph also uses in another way
(`linear_reads` gives None) is left alone: planning does not make such a graph
(`fxlora.planning.plan`). Nothing else in the graph changes.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.layers import BASE_ONLY
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import is_adapted, is_saved, keyword_call
from fxlora.passes.tags import first_tagged, Role
from fxlora.tracing.linear_reads import LinearRead, linear_arguments, linear_reads

__all__ = ["CallWeightReads", "CALL_WEIGHT_READS", "call_weight_reads", "layers_read"]

_KEPT_META = ("stack_trace", "nn_module_stack")


def _adapted_reads(graph: fx.Graph, root: nn.Module) -> list[LinearRead]:
    """The linear reads of adapted (or saved) layers whose every use in `graph` is one, in graph
    order."""
    found = linear_reads(graph, root, lambda path, module: is_adapted(module) or is_saved(module))
    order = {node: i for i, node in enumerate(graph.nodes)}
    return sorted((read for reads in found.values() if reads for read in reads), key=lambda read: order[read.node])


def layers_read(graph: fx.Graph, root: nn.Module) -> list[str]:
    """The adapted (or saved) layers a base `graph` of `root` uses by ``F.linear`` on their weight
    (where this pass calls them): the layers whose adapters the root's own forward skips."""
    return sorted({read.layer for read in _adapted_reads(graph, root)})


def _call_instead(graph: fx.Graph, read: LinearRead) -> None:
    """Replace the ``F.linear`` node of `read` by the layer's call (plus the read's own bias).
    Its arguments are read off the node now: an earlier rewrite may have replaced one."""
    x, _, bias = linear_arguments(read.node)
    with graph.inserting_before(read.node):
        out = graph.call_module(read.layer, (x,))
        new = [out]
        if read.extra_bias is not None:
            out = graph.call_function(operator.add, (out, bias))
            new.append(out)
    for node in new:
        node.meta.update({k: read.node.meta[k] for k in _KEPT_META if k in read.node.meta})
    read.node.replace_all_uses_with(out)
    weight = [n for n in read.node.all_input_nodes if n.op == "get_attr"]
    graph.erase_node(read.node)
    for attr in weight:
        if not attr.users:
            graph.erase_node(attr)


class CallWeightReads(Pass):
    """See the module docstring."""

    name = "call_weight_reads"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", "no node is tagged yet (a base graph as traced)", first_tagged(graph, tuple(Role)))
        self.check("requires", f"no call passes {BASE_ONLY} yet", keyword_call(graph, BASE_ONLY))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Rewrite the reads; the result lists the layer of each, in graph order."""
        reads = _adapted_reads(graph, root)
        for read in reads:
            _call_instead(graph, read)
        return PassResult(self.name, tuple(read.layer for read in reads))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check(
            "ensures",
            "no adapted or saved layer is used through its weight by an F.linear that a call of it equals",
            _first_read(graph, root),
        )


def _first_read(graph: fx.Graph, root: nn.Module) -> Optional[fx.Node]:
    reads = _adapted_reads(graph, root)
    return reads[0].node if reads else None


CALL_WEIGHT_READS = CallWeightReads()


def call_weight_reads(graph: fx.Graph, root: nn.Module) -> PassResult:
    """Run `CallWeightReads` (see the module docstring)."""
    return CALL_WEIGHT_READS(graph, root, PassContext())
