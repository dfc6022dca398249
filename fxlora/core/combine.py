"""Combining adapters into a new one (`LoraModel.add_weighted_adapter`).

Per adapted layer, given adapters ``a_i`` with weights ``w_i``:

- ``"cat"`` (exact): the new adapter's update is ``sum_i w_i * delta_i``. Its A stacks the A's
  (each times ``w_i * scaling_i``), its B stacks the B's; its rank on that layer is the sum of the
  ranks there and its scaling is 1.
- ``"linear"`` (PEFT's): ``A = sum_i sign_i sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i``
  — not the weighted sum of the updates (cross terms), but PEFT's definition; all ranks equal.
- ``"svd"``: the best rank-``svd_rank`` approximation of ``sum_i w_i * delta_i``, for every layer kind:
  Linear, transformers Conv1D, Embedding, Conv1d/2d/3d and ConvTranspose1d/2d/3d with any kernel
  (the kernel is flattened into A's columns; PEFT's version only handles 2-d conv kernels).
- ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (PEFT's, with ``density`` and
  ``majority_sign_method``; `fxlora.core.task_merge`): A and B are each merged as task tensors, A's
  with weights ``sign_i sqrt(|w_i s_i|)``, B's with ``sqrt(|w_i s_i|)``; all ranks equal. Not the
  merge of the updates (cross terms), but PEFT's definition.
- ``"<method>_svd"`` for those four: the updates ``delta_i`` (each shaped like the layer's weight, as
  PEFT prunes them) are merged as task tensors with weights ``w_i``, then cut to rank ``svd_rank``
  as ``"svd"`` does.

The random draws of the DARE methods follow PEFT's order (layer by layer in ``named_modules``
order; per layer A's tensors then B's, or the updates, adapter by adapter), so with the same torch
seed the result equals PEFT's bit for bit (for float32 adapters: fxlora merges in float32 where PEFT
merges bf16/fp16 adapters in their own dtype).

Every layer kind is handled through its matrix view (`fxlora.kinds.Factors`: A (r, in * kernel),
B (out, r)); the kind refuses what its layout cannot hold (``"cat"`` and ``"svd"`` on grouped
convolutions). All arithmetic is float32 (or wider). Nothing here changes a module: the functions
return tensors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from fxlora.kinds import Factors
from fxlora.core.layers import target_meta
from fxlora.core.task_merge import DENSITY_METHODS, merge_task_tensors

__all__ = ["COMBINATIONS", "DENSITY_COMBINATIONS", "EQUAL_RANK_COMBINATIONS", "combined_weights", "layer_rank"]

#: combinations that take ``density`` (and, for the TIES ones, ``majority_sign_method``)
DENSITY_COMBINATIONS = DENSITY_METHODS + tuple(f"{m}_svd" for m in DENSITY_METHODS)
COMBINATIONS = ("cat", "linear", "svd") + DENSITY_COMBINATIONS
#: combinations that merge A and B factor by factor, so every adapter needs the same rank
EQUAL_RANK_COMBINATIONS = ("linear",) + DENSITY_METHODS


def _family(combination: str) -> str:
    """``"cat"``, ``"linear"`` (A and B merged factor by factor) or ``"svd"`` (the updates merged,
    then cut to a rank)."""
    if combination in EQUAL_RANK_COMBINATIONS:
        return "linear"
    return "cat" if combination == "cat" else "svd"


def _factors(module: nn.Module, adapter: str) -> Factors:
    """`adapter`'s factors on `module` as float32 matrices: A (r, in * kernel), B (out, r)."""
    a, b = target_meta(module).kind.as_matrices(module, adapter)
    return Factors(a.float(), b.float())


def _scaling(module: nn.Module, adapter: str) -> float:
    return target_meta(module).adapters[adapter].scaling


def layer_rank(module: nn.Module, adapters: list[str], combination: str, svd_rank: Optional[int]) -> int:
    """Rank of the combined adapter on this layer."""
    ranks = [target_meta(module).adapters[a].r for a in adapters]
    if combination == "cat":
        return sum(ranks)
    if _family(combination) == "linear":
        return ranks[0]
    return svd_rank or max(ranks)


def _cat(module: nn.Module, adapters: list[str], weights: list[float]) -> Factors:
    a_parts, b_parts = [], []
    for adapter, weight in zip(adapters, weights):
        a, b = _factors(module, adapter)
        a_parts.append(a * (weight * _scaling(module, adapter)))
        b_parts.append(b)
    return Factors(torch.cat(a_parts), torch.cat(b_parts, dim=1))


def _linear(module: nn.Module, adapters: list[str], weights: list[float]) -> Factors:
    a_sum = b_sum = None
    for adapter, weight in zip(adapters, weights):
        a, b = _factors(module, adapter)
        w = weight * _scaling(module, adapter)
        root = math.sqrt(abs(w))
        a_part, b_part = a * (root if w >= 0 else -root), b * root
        a_sum = a_part if a_sum is None else a_sum + a_part
        b_sum = b_part if b_sum is None else b_sum + b_part
    return Factors(a_sum, b_sum)


def _signed_roots(module: nn.Module, adapters: list[str], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's per-factor weights: ``sign(w s) sqrt(|w s|)`` for A, ``sqrt(|w s|)`` for B (float32)."""
    scaled = [w * _scaling(module, a) for a, w in zip(adapters, weights)]
    roots = [math.sqrt(abs(w)) for w in scaled]
    return torch.tensor([r if w >= 0 else -r for r, w in zip(roots, scaled)]), torch.tensor(roots)


def _factor_by_factor(
    module: nn.Module, adapters: list[str], weights: list[float], method: str, density: float, sign_method: str
) -> Factors:
    factors = [_factors(module, a) for a in adapters]
    a_weights, b_weights = _signed_roots(module, adapters, weights)
    a = merge_task_tensors(method, [f.a for f in factors], a_weights, density, sign_method)
    b = merge_task_tensors(method, [f.b for f in factors], b_weights, density, sign_method)
    return Factors(a, b)


def _weight_layout_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """``delta_adapter`` (scaling included) laid out like the layer's weight, float32."""
    meta = target_meta(module)
    a, b = _factors(module, adapter)
    return meta.kind.weight_from_matrix(module, b @ a, meta.fan_in_fan_out) * _scaling(module, adapter)


def _matrix_from_weight_layout(module: nn.Module, tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of the kind's ``weight_from_matrix`` (a permutation of the entries: a
    transpose and/or reshape) for a (out, in * kernel) matrix of `shape`."""
    positions = torch.arange(tensor.numel(), dtype=torch.float64).reshape(shape)
    meta = target_meta(module)
    order = meta.kind.weight_from_matrix(module, positions, meta.fan_in_fan_out).reshape(-1).long()
    matrix = tensor.new_empty(tensor.numel())
    matrix[order] = tensor.reshape(-1)
    return matrix.view(shape)


def _pruned_sum(
    module: nn.Module, adapters: list[str], weights: list[float], method: str, density: float, sign_method: str
) -> torch.Tensor:
    """The updates merged by `method` (pruned in the weight's layout, as PEFT does), as one
    (out, in * kernel) matrix, float32."""
    a, b = _factors(module, adapters[0])
    deltas = [_weight_layout_delta(module, adapter) for adapter in adapters]
    merged = merge_task_tensors(method, deltas, torch.tensor(weights), density, sign_method)
    return _matrix_from_weight_layout(module, merged, (b.shape[0], a.shape[1]))


def _weighted_sum(module: nn.Module, adapters: list[str], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i * delta_i`` as one (out, in * kernel) matrix, float32."""
    total = None
    for adapter, weight in zip(adapters, weights):
        a, b = _factors(module, adapter)
        part = (b @ a) * (_scaling(module, adapter) * weight)
        total = part if total is None else total + part
    return total


def _svd(matrix: torch.Tensor, rank: int, clamp: Optional[float], full_matrices: bool, driver: Optional[str]) -> Factors:
    """The best rank-`rank` factors of `matrix` (clamped at the `clamp` quantile, zero-padded to `rank`)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=full_matrices, driver=driver)
    keep = min(rank, s.shape[0])
    b = u[:, :keep] * s[:keep]
    a = vh[:keep]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    if keep < rank:  # fewer singular values than asked: pad with zero directions
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - keep, a.shape[1])])
    return Factors(a, b)


def combined_weights(
    module: nn.Module,
    adapters: list[str],
    weights: list[float],
    combination: str,
    rank: int,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> Factors:
    """The combination's factors on one layer as float32 matrices (`fxlora.kinds.Factors`:
    A (rank, in * kernel), B (out, rank)); the layer's kind writes them into its own layout
    (`LayerKind.write_matrices`). Raises ValueError where the layer's kind cannot hold the
    combination (``"cat"`` and the SVD ones on a grouped convolution).

    Requires: every name in `adapters` is on `module` (the caller passes only those); for the
    `DENSITY_COMBINATIONS`, a checked `density` and `majority_sign_method`.
    """
    family = _family(combination)
    obstacle = target_meta(module).kind.combine_obstacle(module, family)
    if obstacle is not None:
        raise ValueError(obstacle)
    if combination == "cat":
        return _cat(module, adapters, weights)
    if combination == "linear":
        return _linear(module, adapters, weights)
    if family == "linear":
        return _factor_by_factor(module, adapters, weights, combination, density, majority_sign_method)
    if combination == "svd":
        matrix = _weighted_sum(module, adapters, weights)
    else:
        matrix = _pruned_sum(module, adapters, weights, combination[: -len("_svd")], density, majority_sign_method)
    return _svd(matrix, rank, svd_clamp, svd_full_matrices, svd_driver)
