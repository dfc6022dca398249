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

__all__ = ["COMBINATIONS", "combined_weights", "layer_rank"]

COMBINATIONS = ("cat", "linear", "svd")


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
    if combination == "linear":
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


def _weighted_sum(module: nn.Module, adapters: list[str], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i * delta_i`` as one (out, in * kernel) matrix, float32."""
    total = None
    for adapter, weight in zip(adapters, weights):
        a, b = _factors(module, adapter)
        part = (b @ a) * (_scaling(module, adapter) * weight)
        total = part if total is None else total + part
    return total


def _svd(
    module: nn.Module,
    adapters: list[str],
    weights: list[float],
    rank: int,
    clamp: Optional[float],
    full_matrices: bool,
    driver: Optional[str],
) -> Factors:
    matrix = _weighted_sum(module, adapters, weights)
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
) -> Factors:
    """The combination's factors on one layer as float32 matrices (`fxlora.kinds.Factors`:
    A (rank, in * kernel), B (out, rank)); the layer's kind writes them into its own layout
    (`LayerKind.write_matrices`). Raises ValueError where the layer's kind cannot hold the
    combination (``"cat"`` / ``"svd"`` on a grouped convolution).

    Requires: every name in `adapters` is on `module` (the caller passes only those).
    """
    obstacle = target_meta(module).kind.combine_obstacle(module, combination)
    if obstacle is not None:
        raise ValueError(obstacle)
    if combination == "cat":
        return _cat(module, adapters, weights)
    if combination == "linear":
        return _linear(module, adapters, weights)
    return _svd(module, adapters, weights, rank, svd_clamp, svd_full_matrices, svd_driver)
