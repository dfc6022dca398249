"""Pass: fold adapters into the weights of the adapted layers a graph calls.

Requires: `graph` was traced from `root` with every adapted module (one carrying
`fxlora.core.layers.TargetMeta`) as a leaf, as `insert_lora` requires: each call of such a module is one
``call_module`` node whose target is the module's path from `root`.

Guarantees: `merge_graph` folds ``delta = B @ A * scaling * scale`` (`fxlora.core.delta`) of every adapter
named in `scales` into the weight (and, for ``lora_bias``, the bias) of each adapted layer the graph
calls that carries it: once per layer however often the graph calls it, in the order of first call,
layers in `skip` left out, in place (`fxlora.core.fold.fold_layer`: float32 sum, rounded once). It
returns ``{prefix + path: FoldRecord}``, which `fxlora.core.fold.unfold_layer` uses to undo each fold
exactly. Every layer is checked before any weight is written, so a layer that cannot take an adapter
raises `fxlora.core.delta.MergeError` with nothing changed; a failure while writing undoes the layers
already written before it propagates.

The graph is not changed. The branch `insert_lora` spliced after each layer keeps running, multiplied
by its adapter's scale gate, and the model sets that gate to (wanted scale - merged scale): a merged
adapter's branch adds nothing while the adapter is on and subtracts the folded update while it is off
or disabled. So merging never invalidates generated or compiled code.
"""

from __future__ import annotations

from collections.abc import Collection

import torch.fx as fx
import torch.nn as nn

from fxlora.core.fold import FoldRecord, check_fold, fold_layer, layer_scales, unfold_layer
from fxlora.core.layers import target_meta

__all__ = ["merge_targets", "merge_graph"]


def merge_targets(graph: fx.Graph, root: nn.Module, adapters: Collection[str], prefix: str = "") -> dict[str, nn.Module]:
    """``{prefix + path: layer}`` for every adapted layer `graph` calls that carries one of
    `adapters`, in the order of first call, each layer once."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for node in graph.find_nodes(op="call_module"):
        module = root.get_submodule(node.target)
        meta = target_meta(module)
        if meta is None or id(module) in seen or not any(a in meta.adapters for a in adapters):
            continue
        seen.add(id(module))
        found[prefix + node.target] = module
    return found


def merge_graph(
    graph: fx.Graph,
    root: nn.Module,
    scales: dict[str, float],
    prefix: str = "",
    skip: Collection[int] = frozenset(),
    exact: bool = True,
) -> dict[str, FoldRecord]:
    """Run the pass (see the module docstring); `skip` holds ``id()`` of layers to leave out;
    ``exact=False`` keeps no exact-restore data (for a merge that is never undone)."""
    layers = {n: m for n, m in merge_targets(graph, root, scales, prefix).items() if id(m) not in skip}
    for name, module in layers.items():
        check_fold(name, module, layer_scales(module, scales), finite=False)
    records: dict[str, FoldRecord] = {}
    try:
        for name, module in layers.items():
            records[name] = fold_layer(module, layer_scales(module, scales), exact)
    except BaseException:
        for name, record in reversed(records.items()):
            unfold_layer(layers[name], record)
        raise
    return records
