"""Pass: remove the dropout node of LoRA branches whose dropout probability is 0.

Requires: a graph rewritten by `insert_lora` (every adapted call tagged, its branch's dropout
nodes tagged ``DROPOUT``, `fxlora.passes.tags`), each dropout node a module call on one input.

Guarantees: no ``DROPOUT`` node calls an ``nn.Identity`` or an ``nn.Dropout`` with ``p == 0``
any more: each such node is gone and its users read its input. Dropout with ``p > 0`` stays (it
follows ``.train()`` / ``.eval()``).
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import BRANCHES_INSERTED, untagged_adapted_call
from fxlora.passes.tags import Role, tag_of, tagged

__all__ = ["SkipDropout", "SKIP_DROPOUT", "skip_dropout"]


def _is_noop_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)


def _noop_dropout(graph: fx.Graph, root: nn.Module) -> Optional[fx.Node]:
    """A DROPOUT node whose module does nothing."""
    return next((n for n in tagged(graph, Role.DROPOUT) if _is_noop_dropout(root.get_submodule(n.target))), None)


def _odd_dropout(graph: fx.Graph) -> Optional[fx.Node]:
    """A DROPOUT node that is not a module call on one positional input."""
    return next((n for n in tagged(graph, Role.DROPOUT) if n.op != "call_module" or len(n.args) != 1 or n.kwargs), None)


class SkipDropout(Pass):
    """See the module docstring."""

    name = "skip_dropout"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", BRANCHES_INSERTED, untagged_adapted_call(graph, root))
        self.check("requires", "every DROPOUT node is a module call on one positional input", _odd_dropout(graph))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Remove the no-op dropout nodes; the result lists their layers."""
        removed = []
        for node in tagged(graph, Role.DROPOUT):
            if _is_noop_dropout(root.get_submodule(node.target)):
                removed.append(tag_of(node).layer)
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        return PassResult(self.name, tuple(removed))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("ensures", "no DROPOUT node calls an nn.Identity or a dropout with p == 0", _noop_dropout(graph, root))


SKIP_DROPOUT = SkipDropout()


def skip_dropout(graph: fx.Graph, root: nn.Module) -> PassResult:
    """Run `SkipDropout` (see the module docstring)."""
    return SKIP_DROPOUT(graph, root, PassContext())
