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
    """The rows of a mixed batch that use some of a layer's adapters, one group per adapter
    (`fxlora.core.ops.grouped_linear_update`)."""

    adapters: tuple[str, ...]  # the layer's adapters that some row uses, in the layer's order
    positions: tuple[int, ...]  # where each of them is among the layer's adapters
    index: tuple[torch.Tensor, ...]  # each one's row numbers, (rows using it,)
    scales: tuple[float, ...]  # each one's run-time scale in this batch (never 0)


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
        self._index: dict[str, torch.Tensor] = {}
        self._plans: dict[tuple[str, ...], Optional[GroupPlan]] = {}

    def plan(self, adapters: tuple[str, ...]) -> Optional[GroupPlan]:
        """The grouping for a layer carrying `adapters`; None when no row uses any of them."""
        if adapters not in self._plans:
            self._plans[adapters] = self._make_plan(adapters)
        return self._plans[adapters]

    def _make_plan(self, adapters: tuple[str, ...]) -> Optional[GroupPlan]:
        positions = tuple(i for i, a in enumerate(adapters) if a in self.members)
        if not positions:
            return None
        used = tuple(adapters[i] for i in positions)
        return GroupPlan(used, positions, tuple(self._rows_of(a) for a in used), tuple(self.scales[a] for a in used))

    def _rows_of(self, adapter: str) -> torch.Tensor:
        """The row numbers using `adapter`, one tensor per call shared by every layer."""
        if adapter not in self._index:
            self._index[adapter] = torch.tensor(self.members[adapter], device=self.device)
        return self._index[adapter]
