"""Mixed batches: every row of a batch computes with its own adapter (or the base model).

A mixed batch is a call of its own gate state (`fxlora.core.gates.make_row_gate_state`, pinned for that
call alone: no model-wide state changes), whose gates hold one value *per row*: adapter ``a``'s
scale gate on row ``i`` is its scale if row ``i`` names ``a`` and 0 otherwise, its select gate says
whether row ``i`` uses ``a``'s `modules_to_save` copies.

Code under ``torch.compile`` is the same generated code as for a plain call: every adapted layer
computes each adapter's update for the whole batch and the row gates keep the right rows (no
Python loop over rows, no sub-batch indexing), so a compiled model compiles once for the row-gate
shape and never again for a new assignment of adapters to rows.

Eager serving (no autograd) does less work: `fxlora.core.rows.RowGroups` records which rows use which adapter, and
each linear layer computes every adapter on its own rows only, on the adapters' weights as they
are (`fxlora.core.ops.stacked_layer_update`: nothing is kept between calls, so no write to a
weight can be missed). No Python loop over rows runs per layer; one over the adapters used does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["BASE", "batch_size_of", "check_adapter_names"]

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
