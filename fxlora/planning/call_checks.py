"""How often each graph calls the modules planned into it, and the graphs that cannot be built.

A graph root's graphs must call every adapted module they cover wherever they compute with it:
a module its parent uses through its weight is called there by the graph
(`fxlora.passes.weight_reads`) when that use is a *linear read* (`fxlora.tracing.linear_reads`);
any other use of its weight, while it is never called, would silently miss its branch, so the
root cannot be a graph (`WeightRead`, a `TraceFailure`: planning tries the root's children) —
unless the adapter can act on the weight itself (`weight_uses`: an `nn.Linear` used only through
its weight and bias, `fxlora.tracing.linear_reads.weight_only_layers`, with adapters that are a
pure weight update: `fxlora.passes.weight_uses` then hands that code the adapted weight).
"""

from __future__ import annotations

import torch.nn as nn

from fxlora.config import LoraConfig
from fxlora.core.layers import saved_meta, target_meta
from fxlora.core.weight_use import acts_through_weight, some_act_through_weight
from fxlora.errors import TraceFailure, UnsupportedTargetError
from fxlora.kinds.quantized import quantization_of
from fxlora.tracing.linear_reads import attribute_uses
from fxlora.tracing.submodules import named_submodules
from fxlora.tracing.traced import TracedVariant, modules_called

__all__ = ["WeightRead", "check_calls", "check_new_graph", "weight_use_targets"]


class WeightRead(TraceFailure):
    """A graph uses the weights of adapted modules it never calls in a way no rewrite turns into
    a call of them (their full names: `names`)."""

    def __init__(self, names: list[str], rels: list[str]) -> None:
        one = len(rels) == 1
        how = "is used through its weights, not called as a module" if one else "are used through their weights, not called as modules"
        super().__init__(f"{', '.join(rels)} {how}, and not as F.linear(x, weight, bias) that a call equals")
        self.names = names


def check_calls(
    root_name: str, root: nn.Module, variants: dict, names: list[str], weight_uses: frozenset[str] = frozenset()
) -> dict[str, tuple[int, int]]:
    """``(calls, adapted uses)`` of each module of `names` (adapted or saved) in the graphs
    `variants` of `root` (named `root_name`), the most in any one call pattern: its linear reads
    count as calls too (the graph calls it there), as does a graph handing its adapted weight to
    other code (one use per graph). A module whose weights some graph uses
    otherwise while it never calls it would silently miss its branch there, so that root cannot be
    a graph: raises `WeightRead` naming every such module, except those of `weight_uses` (full
    names of targets whose adapters may act on the weight itself) that the graphs use only through
    their weight and bias."""
    counts = dict.fromkeys(names, (0, 0))
    rels = {(name[len(root_name) + 1 :] if root_name else name): name for name in names}
    read_only: dict[str, str] = {}
    for variant in variants.values():
        called = modules_called(variant.graph)
        reads, weight_only = attribute_uses(variant.graph, root, lambda path, module: path in rels)
        by_weight = {rel for rel in weight_only if rels[rel] in weight_uses}
        _check_kept_weight_uses(root, [rel for rel in weight_only if rel not in by_weight], by_weight, rels)
        for rel, name in rels.items():
            linear = reads.get(rel) or []
            uses = len(linear) + (rel in by_weight)  # uses the graph adapts (a call, or the adapted weight)
            counts[name] = max(counts[name], (called.get(rel, 0) + uses, uses))
            if called.get(rel, 0) == 0 and rel in reads and reads[rel] is None and rel not in by_weight:
                read_only[name] = rel
    if read_only:
        raise WeightRead(list(read_only), list(read_only.values()))
    return counts


def check_new_graph(root: nn.Module, variant: TracedVariant) -> None:
    """`check_calls` for a graph of `root` traced after planning (a call pattern met later, a
    pattern planning left pending): the same `WeightRead` or `UnsupportedTargetError` where
    planning would not have made it a graph, its adapted modules as they are now (the ones that
    act through their weight, `acts_through_weight`, as re-planning would say)."""
    names = [rel for rel, m in named_submodules(root) if rel and (target_meta(m) is not None or saved_meta(m) is not None)]
    by_weight = frozenset(rel for rel in names if acts_through_weight(root.get_submodule(rel)))
    check_calls("", root, {variant.key: variant}, names, by_weight)


def _check_kept_weight_uses(root: nn.Module, refused: list[str], served: set[str], rels: dict[str, str]) -> None:
    """UnsupportedTargetError (the change is undone) where an adapter that is no pure weight update
    sits on a layer used only through its weight, in a root where adapters act through weights
    (`served`, or a pure adapter on that layer): the root would leave the graph, and those
    adapters would silently stop acting."""
    if refused and (served or any(some_act_through_weight(root.get_submodule(rel)) for rel in refused)):
        names = [rels[rel] for rel in refused]
        raise UnsupportedTargetError(
            f"{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}: the parent passes the layer's weight to other "
            "code, so adapters there can only act by changing the weight, as the model's other adapters there do; an "
            "adapter with lora_dropout, use_dora or lora_bias cannot (it would make them stop acting). Add it with "
            "lora_dropout=0, no DoRA and no lora_bias, or exclude these layers (exclude_modules)"
        )


def weight_use_targets(model: nn.Module, config: LoraConfig, targets: list) -> frozenset[str]:
    """The names of the layers whose adapters may act through their weight where a parent uses it
    (`fxlora.passes.weight_uses`): `targets` (`fxlora.planning.plan.TargetPlan`s of `config`) that
    are plain (not quantized) `nn.Linear` when `config` is a pure weight update (no dropout on the input, DoRA or a B
    bias), and the layers of `model` not among them whose adapters all are."""
    new = {t.name for t in targets}
    kept = {name for name, module in model.named_modules() if name not in new and acts_through_weight(module)}
    if config.lora_dropout or config.use_dora or config.lora_bias:
        return frozenset(kept)
    return frozenset(kept | {t.name for t in targets if isinstance(t.module, nn.Linear) and quantization_of(t.module) is None})
