"""Merging "task tensors" (one tensor per adapter, same shape) as PEFT 0.21.2 defines it: TIES,
DARE and magnitude pruning (the ``density`` methods of `LoraModel.add_weighted_adapter`).

Per tensor ``t_i`` with weight ``w_i``, after pruning every ``t_i`` to about ``density`` of its entries:

- ``"magnitude_prune"``: keep the ``int(density * numel)`` entries of largest magnitude, then
  ``sum_i w_i * t_i``.
- ``"ties"``: magnitude pruning, then per entry the majority sign over the pruned ``t_i``
  (``"total"``: sign of their sum; ``"frequency"``: the sign more of them have; ties go to +), and
  the mean of ``w_i * t_i`` over the ``t_i`` of that sign (zero where none has it).
- ``"dare_linear"``: keep each entry with probability ``density`` (one Bernoulli draw per entry, tensor by
  tensor in order, entries in memory order) and divide by ``density``, then ``sum_i w_i * t_i``.
- ``"dare_ties"``: DARE's random pruning, then TIES's sign election and mean.

``density >= 1`` prunes nothing and draws no random numbers. The arithmetic (and the order of the
random draws) is PEFT's, so with the same torch seed the result is the same bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["DENSITY_METHODS", "SIGN_METHODS", "merge_task_tensors"]

DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def _prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = torch.zeros_like(tensor).reshape(-1)
    largest = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    keep[largest.indices] = 1
    return tensor * keep.reshape(tensor.shape)


def _prune_at_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density))
    return (tensor * keep) / density


def _majority_agrees(stacked: torch.Tensor, sign_method: str) -> torch.Tensor:
    """Where each task tensor's sign is the elected sign of that entry (a bool tensor)."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    return signs == torch.where(votes >= 0, 1, -1)


def merge_task_tensors(
    method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str = "total"
) -> torch.Tensor:
    """Merge `tensors` with `weights` (a 1-d tensor, one per tensor) by `method` (one of
    `DENSITY_METHODS`, see the module docstring).

    Requires: `method` in `DENSITY_METHODS`, `sign_method` in `SIGN_METHODS`, ``density >= 0``
    (``> 0`` for the DARE methods); the caller checks these."""
    prune = _prune_at_random if method.startswith("dare") else _prune_by_magnitude
    stacked = torch.stack([prune(t, density) for t in tensors], dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        agrees = _majority_agrees(stacked, sign_method)
        return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)
