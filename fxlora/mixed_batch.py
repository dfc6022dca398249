"""Mixed batches: every row of a batch computes with its own adapter (or the base model).

The gate tensors normally hold one value per adapter. For a mixed batch they temporarily hold one
value *per row*: ``scale.<a>[i]`` is adapter ``a``'s scale if row ``i`` names ``a`` and 0
otherwise, ``select.<a>[i]`` says whether row ``i`` uses ``a``'s `modules_to_save` copies. Every
adapted layer then computes each adapter's update for the whole batch and the row gates keep the
right rows: no Python loop over rows or adapters in the forward, no sub-batch indexing, and the same
generated code as a plain call (so a compiled model compiles once for the row-gate shape and never
again for a new assignment of adapters to rows).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["BASE", "mixed_batch", "install_row_gates", "prepare_mixed_batch", "batch_size_of", "check_adapter_names"]

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


@torch.compiler.disable
def install_row_gates(lora_model: Any, names: list[str]) -> Callable[[], None]:
    """Replace the gates of `lora_model` by per-row gates for `names`; return the function that
    puts the per-adapter gates back.

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
    saved_state = gates.eager_state

    @torch.compiler.disable
    def restore() -> None:
        gates.scale._buffers.update(saved_scale)
        gates.select._buffers.update(saved_select)
        gates.eager_state = saved_state

    try:
        gates.eager_state = None  # the row gates decide: run every branch
        for adapter in adapters:
            rows = (row_ids == index[adapter]).to(like.dtype)
            if not lora_model._enabled:
                rows = torch.zeros_like(rows)
            wanted = rows * lora_model._scales.get(adapter, 1.0)
            gates.scale._buffers[adapter] = wanted - lora_model._merged_scale.get(adapter, 0.0)
            gates.select._buffers[adapter] = rows
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
