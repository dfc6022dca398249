"""Mixed batches through layers whose kind computes the adapted call itself (`LayerKind.own_call`:
``target_parameters`` such as fused MoE experts and routers, batch-first ``nn.MultiheadAttention``).

Such a layer's adapters change weights its forward reads, and a weight cannot differ per row. So
a mixed batch calls the layer once per adapter of it that some row uses (the whole batch, with that
adapter alone, as a call with only that adapter active computes it) and once without adapters
(for the rows that use none of them), and takes each output entry along dim 0 from the call of
its row's adapter (``torch.where`` on a mask: no Python loop over rows, no shape that depends on
the assignment of adapters to rows, so compiled code serves every assignment).

Which row an entry belongs to. Let N be the size of dim 0 of the layer's first tensor input and
``rows`` the batch's. Either that input is the batch itself (N == rows: entry i is row i), or
graph code passes the keyword `ROWS_OF`: a tensor whose dim 0 is the batch, of which that input is
a row-major reshape (``view`` / ``reshape`` / ``flatten``, as transformers' sparse-MoE blocks
flatten (batch, seq, hidden) to tokens; found by `fxlora.passes.rows_source`). A row-major reshape
keeps the elements' order, so if ``rows`` divides N, row i holds exactly the entries
``[i * N / rows, (i + 1) * N / rows)``. Anything else raises a `fxlora.core.ops.RowMismatch` naming
the layer's class (its ``layer`` attribute is the layer), never a guess.

Requires: the layer's kind has no `LayerKind.mixed_batch_obstacle` for it (its outputs for one
row's entries depend on that row's inputs only, and each output tensor has one entry per input
entry along dim 0); no adapter is merged (a merged adapter would have to be subtracted on the other
rows' entries: `fxlora.model.mixed_batch` refuses that, and eager code here raises a ValueError).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from fxlora.core.gates import EagerKey, GateState
from fxlora.core.ops import RowMismatch, layer_scaling

if TYPE_CHECKING:
    from fxlora.core.layers import TargetMeta

__all__ = ["ROWS_OF", "is_row_gated", "own_rows_output"]

#: keyword with which graph code calls an own-call layer whose first input is a row-major reshape
#: of a batch-first tensor: that tensor (its eager forward takes the keyword off the call)
ROWS_OF = "_fxlora_rows_of"


def is_row_gated(gates: GateState) -> bool:
    """Whether `gates` hold one gate per batch row (a mixed batch); a static fact under compile."""
    return gates.scale_tensor.dim() == 2


def own_rows_output(
    module: nn.Module, meta: "TargetMeta", adapters: list[str], args: tuple, kwargs: dict,
    gates: GateState, eager: Optional[EagerKey], source: Optional[torch.Tensor],
) -> Any:
    """The output of ``module(*args, **kwargs)`` in a mixed batch (row `gates`): each row's entries
    from the call with its adapter among `adapters` alone, or with none (see the module
    docstring). `source`: the batch-first tensor the first input was reshaped from (`ROWS_OF`),
    or None. In eager code (`eager` given) the rows grouped by adapter (``gates.rows``) say which
    calls are needed and each adapter's multiplier is its Python number (as in a call of a known
    state); in gated code every adapter is called with its gate as a tensor."""
    obstacle = meta.kind.mixed_batch_obstacle(module)
    if obstacle is not None:
        raise ValueError(f"a mixed batch (adapter_names) cannot run through this {type(module).__name__}: {obstacle}")
    like = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    rows = gates.scale_tensor.shape[1]
    share = _entries_per_row(module, like, source, rows)
    groups = None if eager is None else gates.rows
    if eager is not None and groups is None:
        raise ValueError(
            f"a mixed batch (adapter_names) cannot run through this {type(module).__name__} while an adapter is merged "
            "(its weights hold the merged update for every row); unmerge first (unmerge_adapter)"
        )
    calls = []  # (adapter, the rows using it, its multiplier): one call each
    for adapter in adapters:
        scaling = layer_scaling(module, adapter, like, gated=eager is None)
        gate = gates.scale_of(adapter, like)
        if groups is None:
            used = gate != 0
            calls.append((adapter, used, (scaling, _gate_of_users(gate, used))))
        elif adapter in groups.members:
            calls.append((adapter, gate != 0, scaling * groups.scales[adapter]))
    covered = groups is not None and sum(len(groups.members[a]) for a, _, _ in calls) == rows
    out = None if covered else meta.kind.adapted_call(module, args, kwargs, {})
    for adapter, used, multiplier in calls:
        mine = meta.kind.adapted_call(module, args, kwargs, {adapter: multiplier})
        out = mine if out is None else _take(module, used, share, like.shape[0], mine, out)
    return out


def _gate_of_users(gate: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """The 0-d gate of the rows in `used` (all equal: no adapter is merged), read from the first of
    them (any row where none is), with no data-dependent shape."""
    first = used.to(torch.int32).argmax().view(1)
    return gate.index_select(0, first).view(())


def _entries_per_row(module: nn.Module, like: torch.Tensor, source: Optional[torch.Tensor], rows: int) -> int:
    """How many entries along dim 0 of the layer's input `like` each batch row holds (a
    `RowMismatch` where that is not known exactly)."""
    entries = like.shape[0]
    cls = type(module).__name__
    if source is None and entries != rows:
        why = (
            f"the adapter gates hold {rows} rows but this {cls} received {entries} entries on dim 0 of its input "
            f"(shape {tuple(like.shape)}); fxlora takes entry i for row i unless its traced graph shows that the input "
            "is a row-major view/reshape/flatten of a tensor with the batch on dim 0 (as a sparse-MoE block flattens "
            "(batch, seq, hidden) to tokens), and this call has no such graph (an eager call, or a permute, "
            "transpose or indexing on the way)"
        )
    elif source is not None and (source.dim() == 0 or source.shape[0] != rows):
        why = (
            f"the adapter gates hold {rows} rows but the input of this {cls} is a reshape of a tensor of shape "
            f"{tuple(source.shape)}, whose dim 0 is not the batch"
        )
    elif entries % rows:
        why = f"the {entries} entries on dim 0 of this {cls}'s input cannot be split evenly among {rows} rows"
    else:
        return entries // rows
    error = RowMismatch(why)
    error.layer = module
    raise error


def _take(module: nn.Module, used: torch.Tensor, share: int, entries: int, mine: Any, out: Any) -> Any:
    """`out` with the entries of the rows in `used` taken from `mine` (same structure)."""
    mine_leaves, spec = pytree.tree_flatten(mine)
    out_leaves, out_spec = pytree.tree_flatten(out)
    if spec != out_spec:
        raise ValueError(f"{type(module).__name__} returned outputs of different structure for different adapters")
    mask = used if share == 1 else used.view(-1, 1).expand(-1, share).reshape(-1)
    taken = []
    for a, b in zip(mine_leaves, out_leaves):
        if not isinstance(a, torch.Tensor):
            if a is not b and a != b:
                raise ValueError(f"{type(module).__name__} returned {a!r} and {b!r} for different adapters; a mixed batch needs per-entry tensors")
            taken.append(b)
            continue
        if a.dim() == 0 or a.shape[0] != entries:
            raise ValueError(
                f"{type(module).__name__} returned a tensor of shape {tuple(a.shape)}, which has not one entry per "
                f"input entry ({entries}) along dim 0: the rows of a mixed batch cannot be told apart in it"
            )
        taken.append(torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b))
    return pytree.tree_unflatten(taken, spec)
