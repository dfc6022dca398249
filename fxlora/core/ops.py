"""Small tensor functions the LoRA branch is built from.

Each is one opaque ``call_function`` node in a rewritten graph (fx does not trace into them), and
plain Python to ``torch.compile``, which traces straight through them. They hold the only
shape- and dtype-dependent logic of the branch, so the branch itself stays straight-line code.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils import _pytree as pytree

from fxlora.dtypes import cast_like
from fxlora.core.gates import GateState
from fxlora.core.layers import target_meta

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
    "adapter_weights",
    "add_scaled_linear",
    "add_linear_product",
    "scale_by",
    "shared_low_rank",
    "any_open",
    "RowMismatch",
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


def layer_scaling(layer: torch.nn.Module, adapter: str, like: torch.Tensor, gated: bool) -> Any:
    """`adapter`'s scaling on `layer`: in gated code (what torch.compile sees) a hot-swap slot's
    0-d tensor (`fxlora.core.layers.AdapterSpec.scaling_cell`, read per call and put on `like`'s
    device), so that a swap filling it in place reaches compiled code without recompiling; else,
    and for an adapter that is no slot, the spec's number."""
    spec = target_meta(layer).adapters[adapter]
    cell = spec.scaling_cell
    if not gated or cell is None:
        return spec.scaling
    return cell if cell.device == like.device else cell.to(like.device)


def _per_row(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d gate as is; a gate with one value per batch row shaped to broadcast over `like`."""
    if gate.dim() == 0:
        return gate
    _check_rows(gate.shape[0], like)
    return gate.view(-1, *([1] * (like.dim() - 1)))


class RowMismatch(ValueError, RuntimeError):
    """A layer of a mixed batch got an input whose dim 0 is not the batch's rows (a ValueError
    about the call's input; a RuntimeError as it was first raised)."""


def _check_rows(rows: int, like: torch.Tensor) -> None:
    """Row gates (a mixed batch) fit a layer's input only if it has one row per gate value."""
    if rows != like.shape[0]:
        raise RowMismatch(
            f"the adapter gates hold {rows} row{'s' if rows != 1 else ''} but a layer received a batch of {like.shape[0]} "
            f"(a tensor of shape {tuple(like.shape)}); a mixed batch takes rows along dim 0 of the model's inputs "
            "and of every adapted layer's input, so adapter_names needs one entry per row there"
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
    on its own rows only (`grouped_linear_update`), on its weights as they are now (nothing is
    kept between calls, so no write to them can be missed).
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
        factors = [scale * scalings[i] for scale, i in zip(plan.scales, plan.positions)]
        return grouped_linear_update(x, base, adapter_weights(layer, plan.adapters), plan.index, factors)
    lora_a, lora_b = adapter_weights(layer, adapters)
    factors = [(s, gates.scale_of(a, x)) for s, a in zip(scalings, adapters)]
    return stacked_linear_update(x, lora_a, lora_b, factors, base)


def grouped_linear_update(
    x: torch.Tensor,
    base: torch.Tensor,
    weights: tuple[list[torch.Tensor], list[torch.Tensor]],
    index: tuple[torch.Tensor, ...],
    factors: list[float],
) -> torch.Tensor:
    """``base`` plus, on each group's rows (``index[k]``), adapter k's update ``x @ A_k.T @ B_k.T``
    times ``factors[k]``: per adapter two matmuls on its own rows and one ``index_add`` into a
    copy of `base`, in the first A's dtype and rounded once to `base`'s (as `add_update` does).

    It reads the weights themselves, never a copy kept between calls: a kept copy (say the
    adapters' weights stacked for batched matmuls) needs a test that sees every write to them,
    and there is none both cheap and exact: ``Tensor._version`` misses writes through ``p.data``
    (``p.data.add_``, ``p.data.copy_``: a tensor with a counter of its own) and fused optimizer
    steps (``torch.optim.AdamW(fused=True)``), storages carry no version, and comparing contents
    reads as much as copying. Stacking on every call instead copies the K adapters' weights per
    layer and call, and measures slower than these K pairs of small matmuls, which run as fast
    as batched matmuls on kept stacks did (``benchmarks/bench_serving_stacks.py``).

    Requires: `weights` ``([A_1..A_K], [B_1..B_K])`` linear weights (`adapter_weights`), `index`
    K tensors of row numbers (`fxlora.core.rows.GroupPlan`), `factors` K numbers.
    """
    lora_a, lora_b = weights
    x = cast_like(x, lora_a[0])
    out = base.to(x.dtype, copy=True)
    for rows, wa, wb, factor in zip(index, lora_a, lora_b, factors):
        update = torch.nn.functional.linear(torch.nn.functional.linear(x.index_select(0, rows), cast_like(wa, x)), cast_like(wb, x))
        out.index_add_(0, rows, update, alpha=factor)
    return cast_like(out, base)


def adapter_weights(layer: torch.nn.Module, adapters: Iterable[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``([A_1, ..., A_K], [B_1, ..., B_K])``: the weights of a layer's ``lora_A`` / ``lora_B``
    modules for `adapters`."""
    children = layer._modules
    found = []
    for holder in (children["lora_A"]._modules, children["lora_B"]._modules):
        row = []
        for adapter in adapters:
            module = holder[adapter]
            weight = module._parameters.get("weight")
            row.append(module.weight if weight is None else weight)
        found.append(row)
    return found[0], found[1]


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


_HALF = (torch.float16, torch.bfloat16)


def add_linear_product(base: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``base + alpha * hidden @ weight.T`` in one ``addmm`` where dtypes allow (`alpha` a Python
    number: 1, or the multiplier of eager code for a known adapter state). Half precision rounds
    as PEFT does: the product, then the scaled product, then the sum; nested tensors cannot be
    reshaped."""
    dtype = hidden.dtype
    if base.dtype is not dtype or weight.dtype is not dtype or dtype in _HALF or base.is_nested:
        update = torch.nn.functional.linear(hidden, weight)
        return add_update(base, update if alpha == 1.0 else update * alpha)
    if base.dim() == 2:  # a batch of vectors: no reshape (eager code pays for every op between GEMMs)
        return torch.addmm(base, hidden, weight.t(), alpha=alpha)
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
