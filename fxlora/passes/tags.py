"""The tags passes leave on the nodes they create or claim, and the queries that read them.

Every node a pass inserts, and every module call a pass takes charge of, carries a `NodeTag` in
``node.meta[TAG]``: the module it belongs to, the call it belongs to, its `Role` and, where one
adapter's update is computed, that adapter. Later passes find their nodes by these tags only,
never by reading module paths; contracts (`fxlora.passes.base.Pass`) check them.

Who sets which role:

- `swap_saved_modules`: ``SAVED`` on a `modules_to_save` module's own call, ``COPY`` on the calls
  of its trainable copies, ``SELECT`` on the nodes picking a copy's output.
- `guard_idle_branches`: ``GUARDED`` on an adapted layer's call that computes its own branches.
- `insert_lora`: ``OWN`` on a call of a layer whose kind computes its adapted call itself,
  ``LAYER`` on every other adapted layer's call, and the branch roles on the nodes it
  splices (from the template's `fxlora.passes.branch_parts.BranchPart`).
- `share_lora_a`: ``SHARED_A`` on a shared A product, ``LORA_A`` on each layer's slice of it.
- `fold_scaling`: the roles of the nodes it replaces, on the nodes that replace them.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable, NamedTuple, Optional

import torch.fx as fx

__all__ = ["TAG", "Role", "BRANCH_ROLES", "NodeTag", "tag_of", "set_tag", "tagged", "has_role", "first_tagged"]

#: key of a node's `NodeTag` in ``node.meta``
TAG = "fxlora"


class Role(str, Enum):
    """What a tagged node is."""

    LAYER = "layer"  # an adapted layer's own call, whose output the branch adds to
    GUARDED = "guarded"  # an adapted layer's call that computes its own branches (torch.cond)
    OWN = "own"  # a call of an adapted layer whose kind computes the adapted call (`LayerKind.own_call`)
    SAVED = "saved"  # a `modules_to_save` module's own call
    COPY = "copy"  # a call of a `modules_to_save` module's trainable copy
    SELECT = "select"  # picks a copy's output where its adapter is selected
    DROPOUT = "dropout"  # a call of an adapter's dropout module
    LORA_A = "lora_A"  # an adapter's A product: a call of its A module, or its slice of a shared one
    SHARED_A = "shared_A"  # the A products of several layers from one matmul
    LORA_B = "lora_B"  # a call of an adapter's B module
    SCALE = "scale"  # an update times its multiplier
    ADD = "add"  # the branch output: the layer's output plus the updates
    READ = "read"  # an attribute read: an adapter's tensor, or the layer itself
    BRANCH = "branch"  # any other node of a branch (casts, sums, the multipliers' reads)


#: the roles of the nodes that compute a LoRA branch (not the layer's own call)
BRANCH_ROLES = frozenset(
    {Role.DROPOUT, Role.LORA_A, Role.SHARED_A, Role.LORA_B, Role.SCALE, Role.ADD, Role.READ, Role.BRANCH}
)


class NodeTag(NamedTuple):
    """``layer``: path from the root of the adapted (or saved) module the node belongs to;
    ``site``: the name of that module's call node (a layer called twice has two sites);
    ``adapter``: the adapter whose update or copy the node computes, None when it combines several
    adapters or concerns none."""

    layer: str
    site: str
    role: Role
    adapter: Optional[str] = None

    def but(self, role: Role, adapter: Optional[str] = None) -> "NodeTag":
        """The tag of another node of the same site."""
        return NodeTag(self.layer, self.site, role, adapter)


def tag_of(node: fx.Node) -> Optional[NodeTag]:
    """`node`'s tag, or None for a node no pass tagged."""
    return node.meta.get(TAG)


def set_tag(node: fx.Node, tag: NodeTag) -> None:
    node.meta[TAG] = tag


def has_role(node: fx.Node, *roles: Role) -> bool:
    tag = node.meta.get(TAG)
    return tag is not None and tag.role in roles


def tagged(graph: fx.Graph, *roles: Role) -> list[fx.Node]:
    """The nodes tagged with one of `roles`, in graph order."""
    return [node for node in graph.nodes if has_role(node, *roles)]


def first_tagged(graph: fx.Graph, roles: Iterable[Role]) -> Optional[fx.Node]:
    """The first node tagged with one of `roles`, if any."""
    wanted = tuple(roles)
    return next((node for node in graph.nodes if has_role(node, *wanted)), None)
