"""Pass: remove the dropout node of LoRA branches whose dropout probability is 0.

Requires: a graph rewritten by `insert_lora` (branch nodes carry ``meta["fxlora_target"]``).

Guarantees: every ``call_module`` node inserted by `insert_lora` that calls an ``nn.Identity`` or
an ``nn.Dropout`` with ``p == 0`` is gone and its users read its input. Dropout with ``p > 0``
stays (it follows ``.train()`` / ``.eval()``).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

__all__ = ["skip_dropout"]


def _is_noop_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


def skip_dropout(graph: fx.Graph, root: nn.Module) -> int:
    """Run the pass; return the number of nodes removed."""
    removed = 0
    for node in list(graph.find_nodes(op="call_module")):
        if "fxlora_target" not in node.meta or ".lora_dropout." not in f".{node.target}":
            continue
        if _is_noop_dropout(root.get_submodule(node.target)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    return removed
