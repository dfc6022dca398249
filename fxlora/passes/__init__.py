"""Graph passes. Each pass states what it requires of a graph and what it guarantees after.

`rewrite` runs the pipeline that turns a traced base graph into the adapted model's graph.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .insert_lora import insert_lora
from .swap_saved import swap_saved_modules

__all__ = ["rewrite", "insert_lora", "swap_saved_modules"]


def rewrite(graph: fx.Graph, root: nn.Module) -> fx.Graph:
    """Apply the passes in order to `graph` (in place) and return it, linted.

    Requires: `graph` traced from `root` by `fxlora.tracing.trace_variant`.
    """
    swap_saved_modules(graph, root)
    insert_lora(graph, root)
    graph.lint()
    return graph
