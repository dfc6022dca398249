"""Which rows of a mixed batch use which adapter, grouped for eager serving.

Serving a mixed batch without autograd, each adapted linear layer computes every adapter on its
own rows only (`fxlora.core.ops.grouped_linear_update`): `RowGroups` is made once per call (it is part
of that call's `fxlora.core.gates.GateState`) and shared by every layer of it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["GroupPlan", "RowGroups"]


class GroupPlan(NamedTuple):
    """The rows of a mixed batch that use some of a layer's adapters, grouped by adapter and padded
    to equal groups, for batched matmuls over the adapters (`fxlora.core.ops.grouped_linear_update`)."""

    adapters: tuple[str, ...]  # the layer's adapters that some row uses, in the layer's order
    index: torch.Tensor  # (K * G,) row numbers, group after group, padded with the group's first row
    factors: torch.Tensor  # (K, G, 1) each entry's run-time adapter scale, 0 for padding


class RowGroups:
    """Which rows of a mixed batch use which adapter, for eager serving: built once per call,
    shared by every layer. Only made when every row uses at most one adapter's update (no
    adapter is merged: a merged adapter is subtracted on the rows that do not use it)."""

    def __init__(self, names: list[str], scales: dict[str, float], device: torch.device) -> None:
        """`scales`: each adapter's run-time scale in this batch (0: its rows get no update)."""
        self.rows = len(names)
        self.members: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if scales.get(name, 0.0) != 0:
                self.members.setdefault(name, []).append(row)
        self.scales = scales
        self.device = device
        self._plans: dict[tuple[str, ...], Optional[GroupPlan]] = {}

    def plan(self, adapters: tuple[str, ...]) -> Optional[GroupPlan]:
        """The grouping for a layer carrying `adapters`; None when no row uses any of them."""
        if adapters not in self._plans:
            self._plans[adapters] = self._make_plan(adapters)
        return self._plans[adapters]

    def _make_plan(self, adapters: tuple[str, ...]) -> Optional[GroupPlan]:
        used = tuple(a for a in adapters if a in self.members)
        if not used:
            return None
        size = max(len(self.members[a]) for a in used)
        index, factors = [], []
        for a in used:
            rows = self.members[a]
            index += rows + [rows[0]] * (size - len(rows))
            factors += [self.scales[a]] * len(rows) + [0.0] * (size - len(rows))
        return GroupPlan(
            used,
            torch.tensor(index, device=self.device),
            torch.tensor(factors, device=self.device).view(len(used), size, 1),
        )
