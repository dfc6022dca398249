"""Mixed batches: every row of a batch computes with its own adapter (or the base model).

The gate tensors normally hold one value per adapter. For a mixed batch they temporarily hold one
value *per row*: ``scale.<a>[i]`` is adapter ``a``'s scale if row ``i`` names ``a`` and 0
otherwise, ``select.<a>[i]`` says whether row ``i`` uses ``a``'s `modules_to_save` copies.

Code under ``torch.compile`` is the same generated code as for a plain call: every adapted layer
computes each adapter's update for the whole batch and the row gates keep the right rows (no
Python loop over rows, no sub-batch indexing), so a compiled model compiles once for the row-gate
shape and never again for a new assignment of adapters to rows.

Eager serving (no autograd) does less work: `RowGroups` records which rows use which adapter, and
each linear layer computes every adapter on its own rows only, with two batched matmuls over the
adapters on their weights stacked once and kept between calls (`fxlora.ops.stacked_layer_update`,
`fxlora.stacks`). No Python loop over rows or adapters runs per layer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from .variants import branch_gate, variant_for

__all__ = [
    "BASE",
    "RowGroups",
    "GroupPlan",
    "mixed_batch",
    "install_row_gates",
    "prepare_mixed_batch",
    "batch_size_of",
    "check_adapter_names",
]

BASE = "__base__"


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """Rows of the first tensor argument (positional first, then keyword)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("adapter_names needs a batched tensor argument to know the number of rows")


def check_adapter_names(names: Any, known: Sequence[str], rows: int) -> list[str]:
    """`names` as a list, or a clear error (wrong type, unknown name, wrong length)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list with one adapter name per row, got {type(names).__name__}")
    names = list(names)
    unknown = sorted({n for n in names if n != BASE and n not in known}, key=str)
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown} in adapter_names; known: {list(known)} or {BASE!r} for the base model")
    if len(names) != rows:
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {rows} rows; give one name per row")
    return names


class GroupPlan(NamedTuple):
    """The rows of a mixed batch that use some of a layer's adapters, grouped by adapter and padded
    to equal groups, for batched matmuls over the adapters (`fxlora.ops.grouped_linear_update`)."""

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


@torch.compiler.disable
def install_row_gates(lora_model: Any, names: list[str]) -> Callable[[], None]:
    """Replace the gates of `lora_model` by per-row gates for `names`; return the function that
    puts the per-adapter gates back.

    Eager code then runs one code for every assignment of rows: each adapter's branch reads its
    row gate tensor (`fxlora.branch.Live` with gate value None), and linear layers group the rows
    by adapter (`RowGroups`; not when an adapter is merged, which some rows would subtract).

    Requires: `names` checked with `check_adapter_names`. Kept out of ``torch.compile`` entirely
    (it is Python over names, not tensor code).
    """
    gates = lora_model._gates
    adapters = list(lora_model.peft_config)
    like = getattr(gates.scale, adapters[0])
    index = {a: i for i, a in enumerate(adapters)}
    row_ids = torch.tensor([index.get(n, -1) for n in names], device=like.device)
    saved_scale = dict(gates.scale._buffers)
    saved_select = dict(gates.select._buffers)
    saved_state, saved_groups = gates.eager_state, gates.row_groups

    @torch.compiler.disable
    def restore() -> None:
        gates.scale._buffers.update(saved_scale)
        gates.select._buffers.update(saved_select)
        gates.eager_state, gates.row_groups = saved_state, saved_groups

    try:
        used = {a for a in adapters if lora_model._enabled and a in names}
        wanted = {a: lora_model._scales.get(a, 1.0) if a in used else 0.0 for a in adapters}
        for adapter in adapters:
            rows = (row_ids == index[adapter]).to(like.dtype)
            variant = variant_for(lora_model.peft_config[adapter])
            gates.scale._buffers[adapter] = branch_gate(variant, rows * wanted[adapter], lora_model._merged_scale.get(adapter, 0.0))
            gates.select._buffers[adapter] = rows if adapter in used else torch.zeros_like(rows)
        # eager code: every branch reads its row gates (one code for every assignment of rows)
        gates.eager_state = (tuple((a, None) for a in adapters), None)
        gates.row_groups = None if lora_model._merged_scale else RowGroups(names, wanted, like.device)
    except BaseException:
        restore()
        raise
    return restore


@torch.compiler.disable
def prepare_mixed_batch(lora_model: Any, adapter_names: Any, args: tuple, kwargs: dict) -> Callable[[], None]:
    """Check `adapter_names` against the call's batch and install its row gates."""
    names = check_adapter_names(adapter_names, list(lora_model.peft_config), batch_size_of(args, kwargs))
    return install_row_gates(lora_model, names)


@contextlib.contextmanager
def mixed_batch(lora_model: Any, names: list[str]) -> Iterator[None]:
    """Per-row gates for `names` for the duration of the block (restored even on error)."""
    restore = install_row_gates(lora_model, names)
    try:
        yield
    finally:
        restore()
