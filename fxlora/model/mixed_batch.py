"""Mixed batches: every row of a batch computes with its own adapter (or the base model).

A mixed batch is a call of its own gate state (`fxlora.core.gates.make_row_gate_state`, pinned for that
call alone: no model-wide state changes), whose gates hold one value *per row*: adapter ``a``'s
scale gate on row ``i`` is its scale if row ``i`` names ``a`` and 0 otherwise, its select gate says
whether row ``i`` uses ``a``'s `modules_to_save` copies.

Code under ``torch.compile`` is the same generated code as for a plain call: every adapted layer
computes each adapter's update for the whole batch and the row gates keep the right rows (no
Python loop over rows, no sub-batch indexing), so a compiled model compiles once for the row-gate
shape and never again for a new assignment of adapters to rows.

Layers whose kind computes the adapted call itself (`fxlora.kinds.LayerKind.own_call`:
target_parameters, batch-first nn.MultiheadAttention) cannot take a gate per row (their adapters
change weights): they are called once per adapter and each row's entries taken from its adapter's
call (`fxlora.core.own_rows`). Refused up front (`check_row_wise_layers`): such a layer whose kind
names an obstacle (sequence-first attention), and any of them while an adapter is merged.

Eager serving (no autograd) does less work: `fxlora.core.rows.RowGroups` records which rows use which adapter, and
each linear layer computes every adapter on its own rows only, on the adapters' weights as they
are (`fxlora.core.ops.stacked_layer_update`: nothing is kept between calls, so no write to a
weight can be missed). No Python loop over rows runs per layer; one over the adapters used does.

Where the batch is (`check_batch_layout`). Row ``i`` is index ``i`` along dim 0 of the model's
inputs (``len(adapter_names)`` must be the size of dim 0 of the first tensor argument), and every
adapted layer applies its row gates along dim 0 of its own input (and every `modules_to_save`
copy along dim 0 of its output), as PEFT does. A layer whose dim 0 is not that size is refused
at once (`fxlora.core.ops.RowMismatch`). Sizes alone cannot tell the batch from another dimension
of the same size, though: a sequence-first layout, (time, batch, ...) with time == batch, would
take time steps for rows (PEFT's mixed batches do so, silently). So fxlora checks, on the first
mixed batch of each input layout (the inputs' structure, ranks and dtypes, and which of their
dimensions have the batch's size) and adapter set, with four small forward passes of the same
shapes but the batch (in eval mode, without gradients: `fxlora.tracing.probe.quiet_forwards`),
each row with its adapter name:

1. row 0 alone: every adapted layer must see one row on dim 0 (a layer seeing (time, batch, ...)
   sees ``time`` rows there, not one); a layer whose kind computes its call itself and whose
   input graph code shows to be a row-major reshape of another tensor (a sparse-MoE block's
   tokens, `fxlora.core.own_rows`) must see one row on dim 0 of that tensor;
2. rows (0, 1), (0, 0) and (1, 1): in each output, row 0 of the first must be row 0 of the
   second and row 1 of the first row 1 of the third, i.e. a row's outputs must not depend on
   the other row. Rows along a dimension the model mixes (time steps of an RNN, or of
   attention on a sequence-first input, even where attention is indifferent to their order)
   change each other's outputs. The three passes have the same shapes, so they run the same
   kernels: rows computed alike come out alike, and the comparison can be tight.

A layout that fails either, or whose outputs hold no tensor with one entry per row to compare,
is refused with a ValueError saying why; an error of the model itself in these passes is raised
as it is (with a note saying where it came from). Sequence-first models work
with batch-first inputs (``batch_first=True``) or one adapter per call (`set_adapter`).
A batch of one row needs no check. ``generate`` takes rows along dim 0 of its inputs unchecked
(transformers' layout).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from fxlora.core.layers import target_meta
from fxlora.core.ops import RowMismatch
from fxlora.tracing.probe import quiet_forwards

__all__ = ["BASE", "batch_size_of", "check_adapter_names", "check_batch_layout", "check_row_wise_layers", "servable_names"]

BASE = "__base__"

#: per adapter state: the (input layout, adapters) pairs whose rows were checked to be batch rows
_CHECKED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


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
        raise ValueError(
            f"adapter_names has {len(names)} entries but the batch has {rows} rows (dim 0 of the first tensor "
            "argument); give one name per row. A sequence-first input (time, batch, ...) needs batch-first "
            "inputs for mixed batches"
        )
    return names


def servable_names(lm: Any, names: Any, args: tuple, kwargs: dict) -> list[str]:
    """`names` as a list if `lm` (a `LoraModel`) can serve them as a mixed batch for the call with
    `args`, `kwargs`: `check_adapter_names` and `check_row_wise_layers` (asked of every mixed
    call's scope, ``generate``'s included, whose rows are not otherwise checked), else a clear error."""
    checked = check_adapter_names(names, list(lm.peft_config), batch_size_of(args, kwargs))
    check_row_wise_layers(lm)
    return checked


@torch.compiler.disable
def check_batch_layout(lm: Any, adapter_names: Any, args: tuple, kwargs: dict) -> None:
    """Raise ValueError unless `adapter_names` fit the call (`check_adapter_names`) and rows along
    dim 0 of the inputs are the batch's rows for every adapted layer of `lm` (a `LoraModel`; the
    module docstring says how this is found). Changes nothing. (The call's scope refuses layers
    that cannot serve rows, `servable_names`, once per call.)"""
    names = check_adapter_names(adapter_names, list(lm.peft_config), batch_size_of(args, kwargs))
    rows = len(names)
    if rows < 2:
        return  # one row: any dimension of size 1 broadcasts alike
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    layout = tuple((t.dtype, tuple(size == rows for size in t.shape)) for t in leaves)
    key = (pytree.tree_structure((args, kwargs)), layout, tuple((a, id(c)) for a, c in lm.peft_config.items()))
    checked = _CHECKED.setdefault(lm.adapter_state, set())
    if key in checked:
        return

    def run(index: list[int]) -> Any:
        a, k = _rows(args, kwargs, rows, index)
        with lm._scope([names[i] for i in index], a, k):
            return lm.model(*a, **k)

    shapes = [tuple(t.shape) for t in leaves if t.dim() > 0 and t.shape[0] == rows]
    refused = f"adapter_names cannot be applied to inputs of shapes {shapes}: "
    with quiet_forwards(lm.model):
        _check_one_row(lm.model, run, refused)
        why = _not_row_wise(run([0, 1]), [run([0, 0]), run([1, 1])])
    if why:
        raise ValueError(f"{refused}rows along dim 0 are not independent batch rows ({why}), as in a sequence-first (time, batch, ...) layout. {_VALID}")
    checked.add(key)


def check_row_wise_layers(lm: Any) -> None:
    """ValueError naming them if adapted layers of `lm`'s model whose kind computes the adapted call
    itself (`fxlora.kinds.LayerKind.own_call`) cannot serve a mixed batch: their kind says why
    (`LayerKind.mixed_batch_obstacle`: a sequence-first nn.MultiheadAttention), or an adapter is
    merged (such a layer serves rows by calls with one adapter each, `fxlora.core.own_rows`, and a
    merged update sits in the weights of every row)."""
    own = [(n, m, meta) for n, m in lm.model.named_modules() if (meta := target_meta(m)) is not None and meta.kind.own_call and meta.adapters]
    blocked = [(n, why) for n, m, meta in own if (why := meta.kind.mixed_batch_obstacle(m)) is not None]
    if blocked:
        names = [n for n, _ in blocked]
        raise ValueError(
            f"adapter_names (a mixed batch) cannot be served by this model: its adapted layer(s) {names[:4]}"
            f"{' ...' if len(names) > 4 else ''} cannot: {blocked[0][1]}; use one adapter per call (set_adapter), "
            "or exclude those layers"
        )
    merged = lm.adapter_state.merged_adapters
    if own and merged:
        names = [n for n, _, _ in own]
        raise ValueError(
            f"adapter_names (a mixed batch) cannot be served while adapter(s) {merged} are merged: the adapted layer(s) "
            f"{names[:4]}{' ...' if len(names) > 4 else ''} apply adapters through their weights, which hold the merged "
            "update for every row; unmerge first (unmerge_adapter), or use one adapter per call (set_adapter)"
        )


_VALID = (
    "Mixed batches need the batch on dim 0 of the inputs and of every adapted layer's input (batch-first "
    "layouts); otherwise use one adapter per call (set_adapter)"
)


def _check_one_row(model: nn.Module, run: Any, refused: str) -> None:
    """Row 0 alone: every adapted layer must see one row on dim 0 (or, where graph code says its
    input is a reshape of a batch-first tensor, that tensor must: `fxlora.core.own_rows`)."""
    try:
        run([0])
    except RowMismatch as exc:
        layer = getattr(exc, "layer", None)
        where = next((f"layer {n!r}" for n, m in model.named_modules() if m is layer), "a layer")
        raise ValueError(f"{refused}rows along dim 0 are not the batch of every adapted layer: given one row, {where} still saw more ({exc}). {_VALID}") from None
    except Exception as exc:  # the model's own error, as the whole batch would raise it
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note("(raised in fxlora's check of a mixed batch's rows, running row 0 alone: fxlora.model.mixed_batch)")
        raise


def _rows(args: tuple, kwargs: dict, rows: int, index: list[int]) -> tuple[tuple, dict]:
    """`args`, `kwargs` with rows `index` (along dim 0) of every tensor of `rows` rows."""
    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value.index_select(0, torch.tensor(index, device=value.device))
        return value

    return pytree.tree_map(take, (args, kwargs))


def _not_row_wise(pair: Any, twins: list[Any]) -> Optional[str]:
    """None if, in every output tensor of two rows, row ``i`` of `pair` (rows 0 and 1) is row ``i``
    of ``twins[i]`` (row ``i`` twice): a row's outputs do not depend on the other row. Calls of the
    same shapes run the same kernels, so rows computed alike come out alike."""
    compared = 0
    for a, *others in zip(*(pytree.tree_leaves(out) for out in (pair, *twins))):
        if not (isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 2):
            continue
        for row, other in enumerate(others):
            if not isinstance(other, torch.Tensor) or other.shape != a.shape:
                return f"an output of shape {tuple(a.shape)} is {_shape(other)} for other rows"
            compared += 1
            if not _close(a[row], other[row]):
                return f"row {row}'s output changes with row {1 - row}"
    return None if compared else "no output holds one entry per row to compare"


def _shape(value: Any) -> str:
    return f"of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return torch.equal(a, b)
    if not a.numel():
        return True
    info = torch.finfo(a.dtype)
    tol = min(64 * info.eps, 1e-3) * b.abs().max().item() + info.tiny
    return bool((a - b).abs().max().item() <= tol)
