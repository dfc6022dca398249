"""Which part of a LoRA branch each node of a traced branch template is.

`insert_lora` traces `fxlora.core.branch.lora_output` once per kind of branch (a *template*) and splices
copies of it after every adapted layer call; `label_template` gives each template node a
`BranchPart` in ``node.meta[PART]``, which the splice turns into the node's
`fxlora.passes.tags.NodeTag`. This is the one place that knows how a layer holds its adapters
(`fxlora.core.layers`: the ``lora_A`` / ``lora_B`` / ``lora_dropout`` module dicts and the
``lora_embedding_A`` / ``lora_embedding_B`` parameter dicts, keyed by adapter name), and it reads
that layout by object identity, at template-tracing time only:

- a call of an adapter module is that module's part (``LORA_A``, ``LORA_B`` or ``DROPOUT``);
- an attribute read is ``READ``, of the adapter owning the tensor read, if any;
- the node the template returns (base plus the updates) is ``ADD``;
- a `scale_update` / `scale_by` call is ``SCALE``;
- anything else is ``BRANCH`` (casts, sums, and the reads of scaling and gates, left opaque).

A node other than a module call or a read belongs to an adapter when its tagged inputs name that
adapter and no other one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.ops import scale_by, scale_update
from fxlora.passes.conditions import resolve
from fxlora.passes.tags import Role

__all__ = ["PART", "BranchPart", "adapter_parts", "label_template", "part_of"]

#: key of a template node's `BranchPart` in ``node.meta``
PART = "fxlora_part"

#: a layer's children holding its adapters, and the part each entry is
_ADAPTER_CHILDREN: tuple[tuple[str, Role], ...] = (
    ("lora_dropout", Role.DROPOUT),
    ("lora_A", Role.LORA_A),
    ("lora_B", Role.LORA_B),
    ("lora_embedding_A", Role.LORA_A),
    ("lora_embedding_B", Role.LORA_B),
)
_SCALE_OPS = (scale_update, scale_by)


@dataclass(frozen=True)
class BranchPart:
    """A template node's role and the adapter it computes for (None: several or none)."""

    role: Role
    adapter: Optional[str] = None


def adapter_parts(layer: nn.Module) -> dict[int, BranchPart]:
    """``{id(object): part}`` for every adapter module of `layer` and every tensor they hold."""
    parts: dict[int, BranchPart] = {}
    for child, role in _ADAPTER_CHILDREN:
        holder = layer._modules.get(child)
        for adapter, entry in ([] if holder is None else holder.items()):
            parts[id(entry)] = BranchPart(role, adapter)
            if isinstance(entry, nn.Module):
                for tensor in itertools.chain(entry.parameters(), entry.buffers()):
                    parts[id(tensor)] = BranchPart(Role.READ, adapter)
    return parts


def _inputs_adapter(node: fx.Node) -> Optional[str]:
    """The one adapter the labelled inputs of `node` name, else None."""
    named = {n.meta[PART].adapter for n in node.all_input_nodes if PART in n.meta} - {None}
    return named.pop() if len(named) == 1 else None


def part_of(node: fx.Node, host: nn.Module, parts: dict[int, BranchPart], returned: Any) -> BranchPart:
    """`node`'s part (see the module docstring); its inputs are labelled already."""
    if node.op == "call_module":
        return parts.get(id(resolve(host, node.target)), BranchPart(Role.BRANCH))
    if node.op == "get_attr":
        owner = parts.get(id(resolve(host, node.target)))
        return BranchPart(Role.READ, None if owner is None else owner.adapter)
    if node is returned:
        return BranchPart(Role.ADD, _inputs_adapter(node))
    if node.op == "call_function" and node.target in _SCALE_OPS:
        return BranchPart(Role.SCALE, _inputs_adapter(node))
    return BranchPart(Role.BRANCH, _inputs_adapter(node))


def label_template(graph: fx.Graph, host: nn.Module, layer: nn.Module) -> None:
    """Give every node of the template `graph`, traced from `host` (which holds `layer`), its
    `BranchPart`. Run before the targets are made relative to the layer."""
    parts = adapter_parts(layer)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for node in graph.nodes:
        if node.op not in ("placeholder", "output"):
            node.meta[PART] = part_of(node, host, parts, output.args[0])
