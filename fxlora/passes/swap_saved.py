"""Pass: make each `modules_to_save` module's node compute with its trainable copies.

Requires: the graph is untouched by fxlora (no node tagged), and every module carrying
`fxlora.core.layers.SavedMeta` is a leaf of `graph` (one ``call_module`` node per call, target = its
path from `root`).

Guarantees: for every such node ``N = module(*args, **kwargs)`` and every adapter owning a copy,
in order, a node calls ``<module>.modules_to_save.<adapter>`` with the same arguments (tagged
``COPY``, `fxlora.passes.tags`) and ``select_output(select_gate(gates, adapter, copy), copy,
previous)`` picks it wherever the call's select gate is set (tagged ``SELECT``, as is the gate's
read from the graph's gates input, `gates_input`;
`fxlora.core.branch.saved_output` computes the same eagerly). Former users of N read the last
selection, and N's only users are its selections. The original module is still called: it is
what a disabled adapter computes; N is tagged ``SAVED``. With ``chosen`` given instead, the node
calls just the selected copy (tagged ``COPY``), or stays the original's call (tagged ``SAVED``).
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.gates import EagerKey
from fxlora.core.layers import saved_meta
from fxlora.core.ops import select_gate, select_output
from fxlora.passes.base import Pass, PassContext, PassResult
from fxlora.passes.conditions import branch_of, called_module, is_saved, not_a_leaf, untagged_call
from fxlora.passes.gates_input import gates_input
from fxlora.passes.tags import TAG, NodeTag, Role, set_tag, tagged

__all__ = ["SwapSaved", "SWAP_SAVED", "swap_saved_modules"]


def _pick_copy(node: fx.Node, adapters: list[str], chosen: tuple[str, ...]) -> bool:
    """Eager code: retarget the call to the last chosen adapter's copy; False when none is."""
    picked = [a for a in adapters if a in chosen]
    if not picked:
        return False
    tag = NodeTag(node.target, node.name, Role.COPY, picked[-1])
    node.target = f"{node.target}.modules_to_save.{picked[-1]}"
    set_tag(node, tag)
    return True


def _select_copies(graph: fx.Graph, node: fx.Node, adapters: list[str]) -> None:
    """Gated code: after `node`, call every copy and select its output where its gate is set."""
    site = NodeTag(node.target, node.name, Role.SAVED)
    inserted = []
    with graph.inserting_before(node.next):
        out = node
        for adapter in adapters:
            copy = graph.call_module(f"{node.target}.modules_to_save.{adapter}", node.args, node.kwargs)
            gate = graph.call_function(select_gate, (gates_input(graph), adapter, copy))
            out = graph.call_function(select_output, (gate, copy, out))
            set_tag(copy, site.but(Role.COPY, adapter))
            set_tag(gate, site.but(Role.SELECT, adapter))
            set_tag(out, site.but(Role.SELECT, adapter))
            inserted += [copy, gate, out]
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)


def _unswapped_call(graph: fx.Graph, root: nn.Module, chosen: Optional[tuple[str, ...]]) -> Optional[fx.Node]:
    """A SAVED call that still computes for users outside its selections (gated code), or that
    calls a module one of whose copies is chosen (eager code)."""
    for node in tagged(graph, Role.SAVED):
        adapters = saved_meta(root.get_submodule(node.target)).adapters
        if chosen is not None and any(a in chosen for a in adapters):
            return node
        if chosen is None and adapters and not all(branch_of(u, node.name, Role.SELECT) for u in node.users):
            return node
    return None


class SwapSaved(Pass):
    """See the module docstring."""

    name = "swap_saved_modules"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("requires", "no node is tagged by a pass yet", next((n for n in graph.nodes if TAG in n.meta), None))
        self.check("requires", "every saved module is a leaf: one call_module node per call", not_a_leaf(graph, root, is_saved))

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Rewire the saved modules' calls; the result lists the calls rewired. With
        ``ctx.chosen`` (the adapters whose copies are selected, known in Python: eager code for a
        known state) a node simply calls the copy that is used, or stays the original's call."""
        rewired = []
        for node in list(graph.find_nodes(op="call_module")):
            meta = saved_meta(called_module(node, root))
            if meta is None:
                continue
            path = node.target
            if ctx.chosen is not None and _pick_copy(node, meta.adapters, ctx.chosen):
                rewired.append(path)
                continue
            set_tag(node, NodeTag(path, node.name, Role.SAVED))
            if ctx.chosen is None and meta.adapters:
                _select_copies(graph, node, meta.adapters)
                rewired.append(path)
        return PassResult(self.name, tuple(rewired))

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        self.check("ensures", "every call of a saved module is tagged SAVED", untagged_call(graph, root, is_saved, Role.SAVED))
        self.check(
            "ensures",
            "a saved module's own output reaches only its copies' selections (gated code), "
            "or a chosen copy is called instead (eager code)",
            _unswapped_call(graph, root, ctx.chosen),
        )


SWAP_SAVED = SwapSaved()


def swap_saved_modules(graph: fx.Graph, root: nn.Module, chosen: Optional[tuple[str, ...]] = None) -> PassResult:
    """Run `SwapSaved` (see the module docstring) for the chosen copies `chosen` (None: gated code)."""
    return SWAP_SAVED(graph, root, PassContext(eager=None if chosen is None else EagerKey((), chosen)))
