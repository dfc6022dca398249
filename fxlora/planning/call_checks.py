"""How often each graph calls the modules planned into it, and the graphs that cannot be built.

A graph root's graphs must call every adapted module they cover wherever they compute with it:
a module its parent uses through its weight is called there by the graph
(`fxlora.passes.weight_reads`) when that use is a *linear read* (`fxlora.tracing.linear_reads`);
any other use of its weight, while it is never called, would silently miss its branch, so the
root cannot be a graph (`WeightRead`, a `TraceFailure`: planning tries the root's children).
"""

from __future__ import annotations

import torch.nn as nn

from fxlora.errors import TraceFailure
from fxlora.tracing.linear_reads import linear_reads
from fxlora.tracing.traced import modules_called

__all__ = ["WeightRead", "check_calls"]


class WeightRead(TraceFailure):
    """A graph uses the weights of adapted modules it never calls in a way no rewrite turns into
    a call of them (their full names: `names`)."""

    def __init__(self, names: list[str], rels: list[str]) -> None:
        one = len(rels) == 1
        how = "is used through its weights, not called as a module" if one else "are used through their weights, not called as modules"
        super().__init__(f"{', '.join(rels)} {how}, and not as F.linear(x, weight, bias) that a call equals")
        self.names = names


def check_calls(root_name: str, root: nn.Module, variants: dict, names: list[str]) -> dict[str, tuple[int, int]]:
    """``(calls, linear reads)`` of each module of `names` (adapted or saved) in the graphs
    `variants` of `root` (named `root_name`), the most in any one call pattern; its linear reads
    count as calls too (the graph calls it there). A module whose weights some graph uses
    otherwise while it never calls it would silently miss its branch there, so that root cannot be
    a graph: raises `WeightRead` naming every such module."""
    counts = dict.fromkeys(names, (0, 0))
    rels = {(name[len(root_name) + 1 :] if root_name else name): name for name in names}
    read_only: dict[str, str] = {}
    for variant in variants.values():
        called = modules_called(variant.graph)
        reads = linear_reads(variant.graph, root, lambda path, module: path in rels)
        for rel, name in rels.items():
            linear = reads.get(rel) or []
            counts[name] = max(counts[name], (called.get(rel, 0) + len(linear), len(linear)))
            if called.get(rel, 0) == 0 and rel in reads and reads[rel] is None:
                read_only[name] = rel
    if read_only:
        raise WeightRead(list(read_only), list(read_only.values()))
    return counts
