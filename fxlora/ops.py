"""Small tensor functions the LoRA branch is built from.

Each is one opaque ``call_function`` node in a rewritten graph (fx does not trace into them), and
plain Python to ``torch.compile``, which traces straight through them. They hold the only
shape- and dtype-dependent logic of the branch, so the branch itself stays straight-line code.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable, Optional

import torch
from torch.utils import _pytree as pytree

__all__ = [
    "cast_like",
    "scale_update",
    "add_update",
    "select_output",
    "stacked_linear_update",
    "rows_linear_update",
    "grouped_linear_update",
    "add_scaled_linear",
    "add_linear_product",
    "scale_by",
    "shared_low_rank",
    "any_open",
]


def cast_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`x` in `ref`'s dtype (no copy when it already is)."""
    return x if x.dtype == ref.dtype else x.to(ref.dtype)


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


def scale_update(update: torch.Tensor, scaling: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``update * scaling * gate``; `gate` is 0-d or holds one value per batch row."""
    factor = (scaling * gate).to(update.dtype)
    return update * _per_row(factor, update)


def _column_factors(factors: list[torch.Tensor], ranks: list[int]) -> torch.Tensor:
    """Each adapter's factor repeated over its rank: (R,) for 0-d factors, (rows, R) per row."""
    if factors[0].dim() == 0:
        return torch.cat([f.reshape(1).expand(r) for f, r in zip(factors, ranks)])
    return torch.cat([f.reshape(-1, 1).expand(-1, r) for f, r in zip(factors, ranks)], dim=1)


class _DerivedTensors:
    """Tensors derived from other tensors (stacked adapter weights, row-gate columns), kept between
    eager no-grad calls — serving mixed batches — and rebuilt when any source tensor changed
    (``Tensor._version``) or was replaced. An entry is dropped with its first source tensor."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}  # (kind, id of first source, extra) -> (stamp, value)

    def get(self, kind: str, sources: list[torch.Tensor], extra: Hashable, build: Callable[[], Any]) -> Any:
        try:
            stamp = tuple((id(t), t._version) for t in sources)
        except RuntimeError:  # an inference tensor (torch.inference_mode) has no version counter
            return build()
        key = (kind, id(sources[0]), extra)
        entry = self._entries.get(key)
        if entry is None or entry[0] != stamp:
            if entry is None:
                weakref.finalize(sources[0], self._entries.pop, key, None)
            entry = (stamp, build())
            self._entries[key] = entry
        return entry[1]


_DERIVED = _DerivedTensors()


def _reusable() -> bool:
    """Derived tensors may be reused: eager code without autograd (a reused tensor would cut
    the graph to its sources; torch.compile traces the plain computation)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling())


def _stack_t(weights: list[torch.Tensor], dim: int, dtype: torch.dtype, scalings: Optional[list] = None) -> torch.Tensor:
    """The weights (each times its scaling, if given) concatenated along `dim`, transposed."""
    if scalings is not None:
        weights = [w.to(dtype) * s.to(dtype) for w, s in zip(weights, scalings)]
    return torch.cat([w.to(dtype) for w in weights], dim=dim).t()


def stacked_linear_update(
    x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], factors: list, base: torch.Tensor
) -> torch.Tensor:
    """``base + sum_i (x @ A_i.T) * factor_i @ B_i.T`` for the adapters of one linear layer, as two
    matmuls on the stacked weights (A's rows, B's columns) instead of two per adapter, the second
    one an ``addmm`` into `base` where dtypes allow. A factor is ``(scaling, gate)`` tensors (gates
    all 0-d or all one value per row) or a Python number.

    Eagerly without autograd (serving) the stacked weights — B's columns already multiplied by the
    scalings — and the gates repeated over the ranks are reused between calls and layers while
    their sources are unchanged, so a layer runs little more than its two matmuls.

    Requires: no B bias, no dropout (the caller checks).
    """
    dtype = lora_a[0].dtype
    x = cast_like(x, lora_a[0])
    ranks = tuple(a.shape[0] for a in lora_a)
    if isinstance(factors[0], float):
        columns = torch.tensor([f for f, r in zip(factors, ranks) for _ in range(r)], dtype=dtype, device=x.device)
        stacked_a, stacked_b = _stack_t(lora_a, 0, dtype), _stack_t(lora_b, 1, dtype)
    elif _reusable():
        scalings, gates = [s for s, _ in factors], [g for _, g in factors]
        stacked_a, stacked_b = _DERIVED.get("weights", lora_a + lora_b + scalings, dtype, lambda: _stacked_pair(lora_a, lora_b, scalings, dtype))
        columns = _DERIVED.get("gates", gates, (dtype, ranks), lambda: _column_factors([g.to(dtype) for g in gates], ranks))
    else:
        columns = _column_factors([(s * g).to(dtype) for s, g in factors], ranks)
        stacked_a, stacked_b = _stack_t(lora_a, 0, dtype), _stack_t(lora_b, 1, dtype)
    hidden = torch.matmul(x, stacked_a)
    if columns.dim() == 2:
        _check_rows(columns.shape[0], hidden)
        columns = columns.view(columns.shape[0], *([1] * (hidden.dim() - 2)), columns.shape[1])
    return add_linear_product(base, hidden * columns, stacked_b.t())


def rows_linear_update(x: torch.Tensor, base: torch.Tensor, layer: torch.nn.Module, adapters: tuple[str, ...]) -> torch.Tensor:
    """The update of `adapters` on the adapted linear `layer` for a mixed batch (gates with one
    value per row), its weights, scalings and gates read from the layer here: eager code makes this
    one node per layer instead of one attribute read per tensor.

    Serving (no autograd), with the rows grouped by adapter (`fxlora.mixed_batch.RowGroups`), each
    adapter computes on its own rows only (`grouped_linear_update`); otherwise every adapter
    computes on every row and the row gates keep the right ones (`stacked_linear_update`).

    Requires: `layer` carries `adapters` (`fxlora.layers.attach_adapter`), none with a B bias or
    dropout.
    """
    children = layer._modules
    scalings = children["lora_scaling"]._buffers
    groups = children["lora_gates"].__dict__.get("row_groups")
    if groups is not None and groups.rows == x.shape[0] and _reusable():
        plan = groups.plan(adapters)
        if plan is None:
            return base
        sources = _linear_weights(children, plan.adapters) + [scalings[a] for a in plan.adapters]
        if base.dtype == sources[0].dtype:
            stacks = _DERIVED.get("grouped", sources, len(plan.adapters), lambda: _grouped_stacks(sources))
            return grouped_linear_update(x, base, stacks, plan.index, plan.factors)
    weights = _linear_weights(children, adapters)
    gates = children["lora_gates"].scale._buffers
    count = len(adapters)
    return stacked_linear_update(x, weights[:count], weights[count:], [(scalings[a], gates[a]) for a in adapters], base)


def _linear_weights(children: dict, adapters: tuple[str, ...]) -> list[torch.Tensor]:
    """``[A_1.weight, ..., A_K.weight, B_1.weight, ..., B_K.weight]`` of a layer's adapters, from
    its child table (``layer._modules``)."""
    found = []
    for holder in (children["lora_A"]._modules, children["lora_B"]._modules):
        for adapter in adapters:
            module = holder[adapter]
            weight = module._parameters.get("weight")
            found.append(module.weight if weight is None else weight)
    return found


def grouped_linear_update(
    x: torch.Tensor, base: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """``base`` plus, on the rows listed in `index` (K groups of G rows), group k's adapter update
    times its factor: two batched matmuls over the K adapters, ``(K, G*, in) @ (K, in, R)`` and
    ``(K, G*, R) @ (K, R, out)``, then one ``index_add`` into a copy of `base` (padding entries
    have factor 0 and add nothing).

    Requires: `stacks` from `_grouped_stacks` (A transposed; B transposed, times the scalings), in
    `base`'s dtype; `index` (K * G,) and `factors` (K, G, 1) from `fxlora.mixed_batch.GroupPlan`.
    """
    stacked_a, stacked_b = stacks
    groups, rank = stacked_a.shape[0], stacked_a.shape[2]
    rows = cast_like(x, stacked_a).index_select(0, index)
    hidden = torch.bmm(rows.view(groups, -1, stacked_a.shape[1]), stacked_a)
    hidden = hidden.view(factors.shape[0], factors.shape[1], -1) * cast_like(factors, hidden)  # over positions and ranks
    update = torch.bmm(hidden.view(groups, -1, rank), stacked_b)
    return base.index_add(0, index, update.view(index.shape[0], *base.shape[1:]))


def _grouped_stacks(sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, in, R)`` A weights transposed and ``(K, R, out)`` B weights transposed times their
    scalings, from ``[A_1..A_K, B_1..B_K, scaling_1..scaling_K]``; ranks below the largest are
    padded with zeros."""
    k = len(sources) // 3
    lora_a, lora_b, scalings = sources[:k], sources[k : 2 * k], sources[2 * k :]
    rank = max(a.shape[0] for a in lora_a)
    stacked_a = lora_a[0].new_zeros(k, lora_a[0].shape[1], rank)
    stacked_b = lora_b[0].new_zeros(k, rank, lora_b[0].shape[0])
    for i, (a, b, s) in enumerate(zip(lora_a, lora_b, scalings)):
        stacked_a[i, :, : a.shape[0]] = a.t()
        stacked_b[i, : b.shape[1]] = (b * s.to(b.dtype)).t()
    return stacked_a, stacked_b


def _stacked_pair(lora_a: list, lora_b: list, scalings: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous transposed stacks: A's rows, and B's columns times their scalings."""
    return _stack_t(lora_a, 0, dtype).contiguous(), _stack_t(lora_b, 1, dtype, scalings).contiguous()


def add_scaled_linear(
    base: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scaling: torch.Tensor, gate: torch.Tensor
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
