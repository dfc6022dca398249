"""`GateState`: one whole adapter state, as every adapted layer of one call reads it.

An adapted layer multiplies each adapter's update by that adapter's *scale gate* and picks a
`modules_to_save` copy where its *select gate* is set. A `GateState` holds both, per adapter, as
Python numbers (for eager code, which runs only the branches whose gate is non-zero) and as tensors
(for code under ``torch.compile``, which reads tensors only, so that a new state never recompiles).

It is immutable: a state change makes a new one and publishes it (`fxlora.model.state.AdapterState`),
and each call pins the one it started with (`fxlora.runtime.calls`), so a forward racing ``set_adapter``
in another thread sees one whole state, the old one or the new one. A mixed batch is a `GateState`
of its own with one gate value per row, made for that call alone: nothing model-wide changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

import torch

from fxlora.core.rows import RowGroups
from fxlora.variants import LoraVariant, branch_gate

__all__ = ["EagerKey", "GateState", "make_gate_state", "make_row_gate_state"]


class EagerKey(NamedTuple):
    """What eager code is specialised to (`fxlora.runtime.forwards.GraphForward` keeps code per key): the
    adapters whose branch runs and the adapters whose copies are selected — names only, never gate
    values, so the number of keys is bounded by the adapters' subsets, whatever scales are set.
    ``rows``: a mixed batch (every branch reads its row gate tensor; ``chosen`` is then None)."""

    live: tuple[str, ...]
    chosen: Optional[tuple[str, ...]]
    rows: bool = False


@dataclass(frozen=True, eq=False)
class GateState:
    """The gates of every adapter of one model for one call.

    - ``scale`` / ``select``: per adapter, as Python numbers (eager code); empty for a mixed batch.
    - ``scale_tensor`` / ``select_tensor``: ``(adapters,)`` or, for a mixed batch,
      ``(adapters, rows)``; row ``i`` of adapter ``a`` is its gate for batch row ``i``.
    - ``index``: each adapter's position in the tensors.
    - ``eager``: the `EagerKey` eager code for this state runs (None: eager calls run the gated
      code too, as compiled code does).
    - ``rows``: the rows grouped by adapter, for eager serving of a mixed batch (or None).
    """

    scale: Mapping[str, float]
    select: Mapping[str, float]
    scale_tensor: torch.Tensor
    select_tensor: torch.Tensor
    index: Mapping[str, int]
    eager: Optional[EagerKey]
    rows: Optional[RowGroups] = None

    def scale_of(self, adapter: str, like: torch.Tensor) -> torch.Tensor:
        """Adapter `adapter`'s scale gate as a tensor on `like`'s device (0-d, or one per row)."""
        return _on(self.scale_tensor, like)[self.index[adapter]]

    def select_of(self, adapter: str, like: torch.Tensor) -> torch.Tensor:
        """Adapter `adapter`'s select gate as a tensor on `like`'s device (0-d, or one per row)."""
        return _on(self.select_tensor, like)[self.index[adapter]]


def _on(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device == like.device else tensor.to(like.device)


def _tensor(values: list, device: Optional[torch.device]) -> torch.Tensor:
    # an explicit device: under `with torch.device("meta")` gates must still hold real numbers
    return torch.tensor(values, dtype=torch.float32, device=device or "cpu")


def make_gate_state(scale: dict[str, float], select: dict[str, float], device: Optional[torch.device]) -> GateState:
    """The state in which adapter ``a``'s branch is multiplied by ``scale[a]`` and its copies are
    selected where ``select[a]`` is non-zero."""
    adapters = list(scale)
    live = tuple(a for a in adapters if scale[a] != 0)
    chosen = tuple(a for a in adapters if select[a] != 0)
    return GateState(
        scale=dict(scale),
        select=dict(select),
        scale_tensor=_tensor([scale[a] for a in adapters], device),
        select_tensor=_tensor([select[a] for a in adapters], device),
        index={a: i for i, a in enumerate(adapters)},
        eager=EagerKey(live, chosen),
    )


def make_row_gate_state(
    names: list[str],
    wanted: dict[str, float],
    used: "set[str]",
    merged: dict[str, float],
    variants: Mapping[str, LoraVariant],
    device: Optional[torch.device],
) -> GateState:
    """The state of a mixed batch: row ``i`` computes with adapter ``names[i]`` at scale
    ``wanted[a]`` (0 for an adapter no row uses or that is disabled; ``"__base__"``: the base
    model), and with its `modules_to_save` copies where it is in `used`. Each adapter's branch
    gate on a row is its wanted scale there minus the scale it was merged with (``merged``), so a
    merged adapter is subtracted on the rows that do not use it (`fxlora.variants.branch_gate`,
    asked of the adapter's variant in `variants`). Rows are grouped by adapter for
    eager serving unless an adapter is merged."""
    adapters = list(wanted)
    used = set(used)
    using = {a: [1.0 if n == a else 0.0 for n in names] for a in adapters}
    scale = [[branch_gate(variants[a], u * wanted[a], merged.get(a, 0.0)) for u in using[a]] for a in adapters]
    select = [using[a] if a in used else [0.0] * len(names) for a in adapters]
    return GateState(
        scale={},
        select={},
        scale_tensor=_tensor(scale, device).view(len(adapters), len(names)),
        select_tensor=_tensor(select, device).view(len(adapters), len(names)),
        index={a: i for i, a in enumerate(adapters)},
        eager=EagerKey(tuple(adapters), None, rows=True),
        rows=None if merged else RowGroups(names, wanted, device or torch.device("cpu")),
    )
