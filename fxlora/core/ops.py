"""Small tensor functions the LoRA branch is built from.

Each is one opaque ``call_function`` node in a rewritten graph (fx does not trace into them), and
plain Python to ``torch.compile``, which traces straight through them. They hold the only
shape- and dtype-dependent logic of the branch, so the branch itself stays straight-line code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxlora.dtypes import cast_like
from fxlora.core.gates import GateState
from fxlora.core.stacks import adapter_weights, layer_stack

__all__ = [
    "adapter_gate",
    "select_gate",
    "eager_factor",
        "scale_update",
    "add_update",
    "select_output",
    "stacked_linear_update",
    "stacked_layer_update",
    "grouped_linear_update",
    "add_scaled_linear",
    "add_linear_product",
    "scale_by",
    "shared_low_rank",
    "any_open",
]


def adapter_gate(gates: GateState, adapter: str, like: torch.Tensor) -> torch.Tensor:
    """`adapter`'s scale gate in the call's `gates`, on `like`'s device (0-d, or one per row)."""
    return gates.scale_of(adapter, like)


def select_gate(gates: GateState, adapter: str, like: Any) -> torch.Tensor:
    """`adapter`'s select gate in the call's `gates`, on the device of `like` (the first tensor in
    it) (0-d, or one per row)."""
    if not isinstance(like, torch.Tensor):
        like = [t for t in pytree.tree_leaves(like) if isinstance(t, torch.Tensor)][0]
    return gates.select_of(adapter, like)


def eager_factor(gates: GateState, adapter: str, scaling: float) -> float:
    """``scaling * scale gate`` as a Python number (eager code of a known state reads it per call,
    so the code does not depend on the value)."""
    return scaling * gates.scale[adapter]


def _per_row(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d gate as is; a gate with one value per batch row shaped to broadcast over `like`."""
    if gate.dim() == 0:
        return gate
    _check_rows(gate.shape[0], like)
    return gate.view(-1, *([1] * (like.dim() - 1)))


def _check_rows(rows: int, like: torch.Tensor) -> None:
    """Row gates (a mixed batch) fit a layer's input only if it has one row per gate value."""
    if rows != like.shape[0]:
        raise RuntimeError(
            f"the adapter gates hold {rows} rows but a layer received a batch of {like.shape[0]}; "
            "adapter_names needs one entry per row of the batch"
        )


def scale_update(update: torch.Tensor, scaling: float, gate: torch.Tensor) -> torch.Tensor:
    """``update * scaling * gate``; `gate` is 0-d or holds one value per batch row."""
    factor = (gate * scaling).to(update.dtype)
    return update * _per_row(factor, update)


def _column_factors(factors: list[torch.Tensor], ranks: list[int]) -> torch.Tensor:
    """Each adapter's factor repeated over its rank: (R,) for 0-d factors, (rows, R) per row."""
    if factors[0].dim() == 0:
        return torch.cat([f.reshape(1).expand(r) for f, r in zip(factors, ranks)])
    return torch.cat([f.reshape(-1, 1).expand(-1, r) for f, r in zip(factors, ranks)], dim=1)


def stacked_linear_update(
    x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], factors: list, base: torch.Tensor
) -> torch.Tensor:
    """``base + sum_i (x @ A_i.T) * factor_i @ B_i.T`` for the adapters of one linear layer, as two
    matmuls on the stacked weights (A's rows, B's columns) instead of two per adapter, the second
    one an ``addmm`` into `base` where dtypes allow. A factor is ``(scaling, gate)`` tensors (gates
    all 0-d or all one value per row) or a Python number.

    Requires: no B bias, no dropout (the caller checks).
    """
    dtype = lora_a[0].dtype
    x = cast_like(x, lora_a[0])
    ranks = [a.shape[0] for a in lora_a]
    if isinstance(factors[0], float):
        columns = torch.tensor([f for f, r in zip(factors, ranks) for _ in range(r)], dtype=dtype, device=x.device)
    else:
        columns = _column_factors([(g * s).to(dtype) for s, g in factors], ranks)
    hidden = torch.nn.functional.linear(x, torch.cat([a.to(dtype) for a in lora_a]))
    return add_linear_product(base, _times_columns(hidden, columns), torch.cat([b.to(dtype) for b in lora_b], dim=1))


def _times_columns(hidden: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`hidden` (rows, ..., R) times per-rank factors: (R,), or (rows, R) for row gates."""
    if columns.dim() == 2:
        _check_rows(columns.shape[0], hidden)
        columns = columns.view(columns.shape[0], *([1] * (hidden.dim() - 2)), columns.shape[1])
    return hidden * columns


def stacked_layer_update(
    x: torch.Tensor, base: torch.Tensor, layer: torch.nn.Module, adapters: tuple[str, ...], gates: GateState, scalings: tuple
) -> torch.Tensor:
    """`base` plus the updates of `adapters` (with their `scalings`) on the adapted linear `layer`
    for a mixed batch (row `gates`), their tensors read from the layer here: eager code makes this
    one node per layer instead of one attribute read per tensor.

    Serving (no autograd, rows grouped by adapter: `fxlora.core.rows.RowGroups`), each adapter computes
    on its own rows only (`grouped_linear_update`, on the layer's `fxlora.core.stacks.AdapterStack`).
    Otherwise (with autograd, or with a merged adapter, which some rows subtract) every adapter
    computes on every row and the row gates keep the right ones (`stacked_linear_update`).

    Requires: `layer` carries `adapters` (`fxlora.core.layers.attach_adapter`), none with a B bias or
    dropout.
    """
    groups = gates.rows
    if groups is not None and groups.rows == x.shape[0] and not torch.is_grad_enabled():
        plan = groups.plan(adapters)
        if plan is None:
            return base
        stack = layer_stack(layer, plan.adapters, tuple(scalings[adapters.index(a)] for a in plan.adapters))
        return grouped_linear_update(x, base, (stack.a, stack.b), plan.index, plan.factors)
    lora_a, lora_b = adapter_weights(layer, adapters)
    factors = [(s, gates.scale_of(a, x)) for s, a in zip(scalings, adapters)]
    return stacked_linear_update(x, lora_a, lora_b, factors, base)


def grouped_linear_update(
    x: torch.Tensor, base: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """``base`` plus, on the rows listed in `index` (K groups of G rows), group k's adapter update
    times its factor: two batched matmuls over the K adapters, ``(K, G*, in) @ (K, in, R)`` and
    ``(K, G*, R) @ (K, R, out)``, then one ``index_add`` into a copy of `base` (padding entries
    have factor 0 and add nothing), in the adapters' dtype and rounded once to `base`'s (as
    `add_update` does).

    Requires: `stacks` ``(K, in, R)`` A weights transposed and ``(K, R, out)`` B weights transposed
    times their scalings (`fxlora.core.stacks.AdapterStack`); `index`
    ``(K * G,)`` and `factors` ``(K, G, 1)`` from `fxlora.core.rows.GroupPlan`.
    """
    stacked_a, stacked_b = stacks
    groups, rank = stacked_a.shape[0], stacked_a.shape[2]
    rows = cast_like(x, stacked_a).index_select(0, index)
    hidden = torch.bmm(rows.view(groups, -1, stacked_a.shape[1]), stacked_a)
    hidden = hidden.view(factors.shape[0], factors.shape[1], -1) * cast_like(factors, hidden)  # over positions and ranks
    update = torch.bmm(hidden.view(groups, -1, rank), stacked_b)
    out = cast_like(base, update).index_add(0, index, update.view(index.shape[0], *base.shape[1:]))
    return cast_like(out, base)


def add_scaled_linear(
    base: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scaling: float, gate: torch.Tensor
) -> torch.Tensor:
    """``base + (hidden * scaling * gate) @ weight.T``: the B product of a linear layer's branch,
    scaled on the rank-r side and added to the base output in one ``addmm`` where dtypes allow."""
    return add_linear_product(base, scale_update(hidden, scaling, gate), weight)


def shared_low_rank(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(x @ A_1.T, x @ A_2.T, ...)`` for A weights that read the same input, from one matmul on
    the concatenated weights."""
    x = cast_like(x, weights[0])
    hidden = torch.nn.functional.linear(x, torch.cat([w.to(weights[0].dtype) for w in weights]))
    return torch.split(hidden, [w.shape[0] for w in weights], dim=-1)


def scale_by(update: torch.Tensor, factor: float) -> torch.Tensor:
    """``update * factor`` for a Python number (eager code of a known adapter state)."""
    return update * factor


def add_linear_product(base: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``base + alpha * hidden @ weight.T`` in one ``addmm`` where dtypes allow (`alpha` a Python
    number: 1, or the multiplier of eager code for a known adapter state)."""
    if base.dtype != hidden.dtype or weight.dtype != hidden.dtype:
        update = torch.nn.functional.linear(hidden, weight)
        return add_update(base, update if alpha == 1.0 else update * alpha)
    out = torch.addmm(base.reshape(-1, weight.shape[0]), hidden.reshape(-1, weight.shape[1]), weight.t(), alpha=alpha)
    return out.view(base.shape)


def add_update(base: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``base + update`` in `base`'s dtype (the update may be float32 on a half-precision base)."""
    out = base + update
    return out if out.dtype == base.dtype else out.to(base.dtype)


def select_output(gate: torch.Tensor, new: Any, old: Any) -> Any:
    """`new` where `gate` is non-zero (per batch row when `gate` is 1-d), else `old`.

    Works leaf by leaf on tensors nested in tuples/lists/dicts; non-tensor leaves come from `old`.
    """

    def pick(n: Any, o: Any) -> Any:
        if not (isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor)):
            return o
        return torch.where(_per_row(gate, n) != 0, n, o)

    if isinstance(new, torch.Tensor):
        return pick(new, old)
    return pytree.tree_map(pick, new, old)


def any_open(gates: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor: is any of `gates` (0-d, or one value per batch row) non-zero anywhere."""
    return torch.stack([gate.ne(0).any() for gate in gates]).any()
