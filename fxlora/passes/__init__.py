"""Graph passes. Each pass states what it requires of a graph and what it guarantees after.

`rewrite` runs the pipeline that turns a traced base graph into the adapted model's graph: the
passes that add LoRA (`swap_saved_modules`, `insert_lora`, `mark_base_calls`), then the
optimisations switched on in `PassOptions` (`skip_dropout`, `share_lora_a`, `fold_scaling`). The
opt-in `guard_idle_branches` runs before `insert_lora` on gated evaluation code: it marks the
layer calls whose branches the layers then compute themselves, under ``torch.cond``.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from ..gates import EagerKey
from .base_calls import mark_base_calls
from .fold_scaling import fold_scaling
from .gates_input import gates_input
from .guard_idle import guard_idle_branches
from .insert_lora import insert_lora
from .options import PassOptions
from .share_lora_a import share_lora_a
from .skip_dropout import skip_dropout
from .swap_saved import swap_saved_modules

__all__ = [
    "rewrite",
    "PassOptions",
    "mark_base_calls",
    "insert_lora",
    "swap_saved_modules",
    "skip_dropout",
    "share_lora_a",
    "fold_scaling",
    "guard_idle_branches",
]


def rewrite(
    graph: fx.Graph,
    root: nn.Module,
    options: Optional[PassOptions] = None,
    eager: Optional[EagerKey] = None,
    training: bool = True,
) -> fx.Graph:
    """Apply the passes in order to `graph` (in place) and return it, linted. The result takes the
    call's gates as its first input (`gates_input`).

    `eager` is None for code that reads the adapter state from gate tensors only (what
    torch.compile sees), or the `fxlora.gates.EagerKey` of eager code that runs only the branches
    and copies in use. `training` says which mode the graph was traced for (gated evaluation code
    guards idle branches, see `guard_idle_branches`).

    Requires: `graph` traced from `root` by `fxlora.tracing.trace_variant`.
    """
    options = PassOptions() if options is None else options
    gates_input(graph)
    swap_saved_modules(graph, root, None if eager is None else eager.chosen)
    if options.guard_idle and eager is None and not training:
        guard_idle_branches(graph, root)
    insert_lora(graph, root, eager)
    mark_base_calls(graph, root)
    if options.skip_dropout:
        skip_dropout(graph, root)
    if options.share_lora_a:
        share_lora_a(graph, root)
    if options.fold_scaling:
        fold_scaling(graph, root)
    graph.lint()
    return graph
