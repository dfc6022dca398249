"""Combining adapters into a new one (`LoraModel.add_weighted_adapter`).

Per adapted layer, given adapters ``a_i`` with weights ``w_i``:

- ``"cat"`` (exact): the new adapter's update is ``sum_i w_i * delta_i``. Its A stacks the A's
  (each times ``w_i * scaling_i``), its B stacks the B's; its rank on that layer is the sum of the
  ranks there and its scaling is 1.
- ``"linear"`` (PEFT's): ``A = sum_i sign_i sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i``
  — not the weighted sum of the updates (cross terms), but PEFT's definition; all ranks equal.
- ``"svd"``: the best rank-``svd_rank`` approximation of ``sum_i w_i * delta_i``, for every layer kind:
  Linear, transformers Conv1D, Embedding, and Conv1d/2d/3d with any kernel (the kernel is flattened
  into A's columns; PEFT's version only handles 2-d kernels).

All arithmetic is float32 (or wider). Nothing here changes a module: the functions return tensors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .delta import delta_weight
from .layers import target_meta

__all__ = ["COMBINATIONS", "combined_weights", "layer_rank"]

COMBINATIONS = ("cat", "linear", "svd")


def _factors(module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of `adapter` on `module` as float32 matrices-with-kernel: A (r, in, *k), B (out, r)."""
    meta = target_meta(module)
    if meta.kind == "embedding":
        return module.lora_embedding_A[adapter].float(), module.lora_embedding_B[adapter].float()
    a = module.lora_A[adapter].weight.float()
    b = module.lora_B[adapter].weight.float()
    return a, b.reshape(b.shape[0], b.shape[1])


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


def _cat(module: nn.Module, adapters: list[str], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    meta = target_meta(module)
    if meta.kind == "conv" and module.groups != 1:
        raise ValueError(
            f"combination 'cat' cannot stack adapters of a grouped convolution (groups={module.groups}); "
            "use combination_type='svd' on ungrouped layers or combine fewer adapters"
        )
    a_parts, b_parts = [], []
    for adapter, weight in zip(adapters, weights):
        a, b = _factors(module, adapter)
        a_parts.append(a * (weight * _scaling(module, adapter)))
        b_parts.append(b)
    return torch.cat(a_parts), torch.cat(b_parts, dim=1)


def _linear(module: nn.Module, adapters: list[str], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    a_sum = b_sum = None
    for adapter, weight in zip(adapters, weights):
        a, b = _factors(module, adapter)
        w = weight * _scaling(module, adapter)
        root = math.sqrt(abs(w))
        a_part, b_part = a * (root if w >= 0 else -root), b * root
        a_sum = a_part if a_sum is None else a_sum + a_part
        b_sum = b_part if b_sum is None else b_sum + b_part
    return a_sum, b_sum


def _as_matrix(module: nn.Module, delta: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The update as an (out, in * kernel) matrix B @ A, and A's trailing shape (in, *kernel)."""
    meta = target_meta(module)
    if meta.kind == "embedding":
        matrix = delta.T  # (dim, num_embeddings) = B @ A
    elif meta.kind == "linear" and meta.fan_in_fan_out:
        matrix = delta.T  # Conv1D stores (in, out)
    else:
        matrix = delta.reshape(delta.shape[0], -1)
    a_tail = tuple(_factors(module, next(iter(meta.adapters)))[0].shape[1:])
    return matrix, a_tail


def _svd(
    module: nn.Module,
    adapters: list[str],
    weights: list[float],
    rank: int,
    clamp: Optional[float],
    full_matrices: bool,
    driver: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    total = None
    for adapter, weight in zip(adapters, weights):
        d = delta_weight(module, adapter, scale=weight, dtype=torch.float32)
        total = d if total is None else total + d
    matrix, a_tail = _as_matrix(module, total)
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
    return a.reshape(rank, *a_tail), b


def combined_weights(
    module: nn.Module,
    adapters: list[str],
    weights: list[float],
    combination: str,
    rank: int,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combination on one layer, float32, shaped like the layer's LoRA factors
    (B as an (out, rank) matrix; the caller reshapes it to the B module's weight).

    Requires: every name in `adapters` is on `module` (the caller passes only those).
    """
    if combination == "cat":
        return _cat(module, adapters, weights)
    if combination == "linear":
        return _linear(module, adapters, weights)
    return _svd(module, adapters, weights, rank, svd_clamp, svd_full_matrices, svd_driver)
