"""Pass: scale a branch on its rank-r side and fuse the B product with the add.

Requires: a graph rewritten by `insert_lora` (branch nodes carry ``meta["fxlora_target"]``).

Guarantees: wherever ``add_update(base, scale_update(B(h), scaling, gate))`` appears with B a
bias-free ``nn.Linear`` (and each intermediate used once), it becomes one node
``add_scaled_linear(base, h, B.weight, scaling, gate)`` (an ``addmm``). With B a bias-free ConvNd
it becomes ``add_update(base, B(scale_update(h, scaling, gate)))``: the scaling multiplies r
channels instead of the layer's output channels. A B with a bias is left alone (the bias is scaled
too). The values are equal up to float rounding.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..ops import add_scaled_linear, add_update, scale_update

__all__ = ["fold_scaling"]


def _match(out: fx.Node, root: nn.Module):
    """(base, scale node, B node, B module) if `out` is an add of one scaled B product."""
    if out.op != "call_function" or out.target is not add_update or "fxlora_target" not in out.meta:
        return None
    base, scaled = out.args
    if not isinstance(scaled, fx.Node) or scaled.target is not scale_update or len(scaled.users) != 1:
        return None
    update = scaled.args[0]
    if not isinstance(update, fx.Node) or update.op != "call_module" or len(update.users) != 1:
        return None
    if ".lora_B." not in f".{update.target}":
        return None
    module = root.get_submodule(update.target)
    if getattr(module, "bias", None) is not None:
        return None
    return base, scaled, update, module


def fold_scaling(graph: fx.Graph, root: nn.Module) -> int:
    """Run the pass; return the number of branches folded."""
    folded = 0
    for out in list(graph.find_nodes(op="call_function", target=add_update)):
        found = _match(out, root)
        if found is None:
            continue
        base, scaled, update, module = found
        hidden = update.args[0]
        _, scaling, gate = scaled.args
        tag = out.meta["fxlora_target"]
        with graph.inserting_before(out):
            if isinstance(module, nn.Linear):
                weight = graph.get_attr(f"{update.target}.weight")
                new = graph.call_function(add_scaled_linear, (base, hidden, weight, scaling, gate))
                created = [weight, new]
            else:
                scaled_hidden = graph.call_function(scale_update, (hidden, scaling, gate))
                product = graph.call_module(update.target, (scaled_hidden,))
                new = graph.call_function(add_update, (base, product))
                created = [scaled_hidden, product, new]
        for node in created:
            node.meta["fxlora_target"] = tag
        out.replace_all_uses_with(new)
        for dead in (out, scaled, update):
            graph.erase_node(dead)
        folded += 1
    return folded
