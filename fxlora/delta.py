"""The weight update ("delta") of one adapter on one layer, per layer type.

An adapted layer computes ``base(x) + B(A(x)) * scaling * scale``. Because every supported layer is
linear in its weight, the same output comes from the base layer alone with its weight replaced by
``weight + delta`` (and, with ``lora_bias``, its bias by ``bias + B.bias * scaling * scale``):

- ``"linear"`` (`nn.Linear`): ``delta = B @ A``, shape ``(out, in)``;
  transformers ``Conv1D`` stores its weight as ``(in, out)`` (fan_in_fan_out): ``delta = (B @ A).T``;
- ``"conv"`` (`nn.Conv1d/2d/3d`): A has the base layer's kernel, stride, padding, dilation and padding
  mode and B is a 1x..x1 convolution, so the composition is one convolution with the base's geometry
  and the kernel ``delta[o, i, ...] = sum_j B[o, j] * A[j, i, ...]``, shape ``(out, in, *kernel)``.
  A grouped base (``groups > 1``) cannot take it: its kernel only connects channels within a group,
  while the update connects every input channel to every output channel (`MergeError`);
- ``"embedding"`` (`nn.Embedding`): ``delta = (B @ A).T``, shape ``(num_embeddings, embedding_dim)``.
  With ``max_norm`` the base renormalises looked-up rows, which does not commute with adding the
  update (`MergeError`).

Every delta is computed in float32 (or wider, when the base or the adapter is wider) from the adapter
weights as they are, times the adapter's scaling (its spec's alpha/r, as the forward uses) and the run-time `scale`.
Nothing here writes to a module.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .layers import target_meta

__all__ = ["MergeError", "compute_dtype", "check_mergeable", "delta_weight", "delta_bias"]


class MergeError(ValueError):
    """An adapter cannot be folded into a layer's weights (the message says which and why)."""


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or the widest floating dtype among `tensors` when that is wider (float64)."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype.is_floating_point:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _describe(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'!r} ({type(module).__name__})"


def check_mergeable(name: str, module: nn.Module, adapter: str) -> None:
    """Raise `MergeError` if `adapter` on the layer `module` (called `name`) cannot be folded into
    its weights; return None if it can. Requires: `module` carries `adapter`."""
    meta = target_meta(module)
    where = _describe(name, module)
    if meta.kind == "conv" and module.groups != 1:
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {where}: the layer is a grouped convolution "
            f"(groups={module.groups}) and a LoRA update connects every input channel to every output "
            "channel, which a grouped kernel cannot hold; keep this adapter unmerged, or exclude the layer "
            "(exclude_modules) if you need merged weights"
        )
    if meta.kind == "embedding" and module.max_norm is not None:
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {where}: the embedding renormalises rows "
            f"(max_norm={module.max_norm}), so the merged lookup would differ from base + update; "
            "keep this adapter unmerged"
        )
    if meta.adapters[adapter].lora_bias and getattr(module, "bias", None) is None:
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {where}: the adapter has a bias (lora_bias=True) but "
            "the layer has none to fold it into; keep this adapter unmerged"
        )


def _low_rank_product(module: nn.Module, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """``B @ A`` with the layer's input/output axes: (out, in) or (out, in, *kernel)."""
    meta = target_meta(module)
    if meta.kind == "embedding":
        a = module.lora_embedding_A[adapter].to(dtype)  # (r, num_embeddings)
        b = module.lora_embedding_B[adapter].to(dtype)  # (embedding_dim, r)
        return b @ a  # (embedding_dim, num_embeddings)
    a = module.lora_A[adapter].weight.to(dtype)
    b = module.lora_B[adapter].weight.to(dtype)
    if meta.kind == "linear":
        return b @ a
    # conv: A (r, in, *kernel), B (out, r, 1, ...) when groups == 1
    kernel = a.shape[2:]
    return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], a.shape[1], *kernel)


def _factor(module: nn.Module, adapter: str, scale: float) -> float:
    return target_meta(module).adapters[adapter].scaling * float(scale)


def delta_weight(module: nn.Module, adapter: str, scale: float = 1.0, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The update `adapter` adds to ``module.weight`` at run-time scale `scale`, shaped like the
    weight, in `dtype` (default: `compute_dtype` of the weight and the adapter, at least float32).

    Requires: `check_mergeable` passed for (`module`, `adapter`)."""
    meta = target_meta(module)
    weight = module.weight
    dtype = dtype or compute_dtype(weight, *_adapter_tensors(module, adapter))
    product = _low_rank_product(module, adapter, dtype)
    if meta.kind == "embedding" or (meta.kind == "linear" and meta.fan_in_fan_out):
        product = product.T
    if product.shape != weight.shape:
        raise MergeError(
            f"adapter {adapter!r} gives an update of shape {tuple(product.shape)} for a weight of shape "
            f"{tuple(weight.shape)} on {type(module).__name__}; its fan_in_fan_out setting does not fit the layer"
        )
    return product * _factor(module, adapter, scale)


def delta_bias(module: nn.Module, adapter: str, scale: float = 1.0, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """The update `adapter` adds to ``module.bias`` (``B.bias * scaling * scale``), or None when
    the adapter has no bias (``lora_bias=False``)."""
    meta = target_meta(module)
    if meta.kind == "embedding" or not meta.adapters[adapter].lora_bias:
        return None
    b_bias = module.lora_B[adapter].bias
    dtype = dtype or compute_dtype(module.bias, b_bias)
    return b_bias.to(dtype) * _factor(module, adapter, scale)


def _adapter_tensors(module: nn.Module, adapter: str) -> list[torch.Tensor]:
    if target_meta(module).kind == "embedding":
        return [module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]]
    return [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
