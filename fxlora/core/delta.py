"""The weight update ("delta") of one adapter on one layer.

An adapted layer computes ``base(x) + B(A(x)) * scaling * scale``. Because every supported layer is
linear in its weight, the same output comes from the base layer alone with its weight replaced by
``weight + delta`` (and, with ``lora_bias``, its bias by ``bias + B.bias * scaling * scale``). The
layer's kind (`fxlora.kinds`) gives the adapter's factors as matrices, ``B @ A`` an (out, in * kernel)
matrix, and lays that matrix out like the layer's weight (``(out, in)`` for ``nn.Linear``, its
transpose for transformers ``Conv1D`` and ``nn.Embedding``, ``(out, in, *kernel)`` for ConvNd,
``(in, out, *kernel)`` for ConvTransposeNd); it also says when a layer cannot take a delta at all
(grouped convolutions, embeddings with ``max_norm``, classes whose forward is not linear in the
weight: `MergeError`). So does a layer whose weight (or bias, for ``lora_bias``) is not a tensor
of its own but computed from others at each call (``torch.nn.utils.parametrize`` weight_norm /
spectral_norm, the older hook-based ``weight_norm``): writing into the computed tensor changes
nothing, and a normalised weight with an update added is no longer the normalisation of anything.

Every delta is computed in float32 (or wider, when the base or the adapter is wider) from the adapter
weights as they are, times the adapter's scaling (``AdapterSpec.scaling``) and the run-time `scale`.
Nothing here writes to a module.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from fxlora.errors import MergeError
from fxlora.dtypes import compute_dtype
from fxlora.core.layers import target_meta
from fxlora.kinds.quantized import weight_shape

__all__ = ["check_mergeable", "delta_weight", "delta_bias", "layer_tensor", "folded_tensors"]


def folded_tensors(module: nn.Module) -> tuple[str, ...]:
    """Paths of the layer's tensors a merge may change: its kind's `merged_weights`, then ``"bias"``
    (changed only by a ``lora_bias``)."""
    return (*target_meta(module).kind.merged_weights(module), "bias")


def _describe(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'!r} ({type(module).__name__})"


def _computed(module: nn.Module, which: str) -> Optional[str]:
    """Why `module`'s `which` tensor is computed rather than held (a sentence), or None."""
    if module._parameters.get(which) is not None:
        return None
    if which in getattr(module, "parametrizations", {}):
        names = [type(p).__name__ for p in module.parametrizations[which]]
        how = f"a parametrization ({', '.join(names)}, torch.nn.utils.parametrize)"
        fix = f"torch.nn.utils.parametrize.remove_parametrizations(layer, {which!r})"
    else:
        hooks = [type(h).__name__ for h in module._forward_pre_hooks.values()]
        how = f"a forward pre-hook ({', '.join(hooks) or 'none found'}: the hook-based weight_norm / spectral_norm of torch.nn.utils)"
        fix = "torch.nn.utils.remove_weight_norm(layer) / remove_spectral_norm(layer)"
    return (
        f"its {which} is not a tensor of its own but is computed at each call by {how}, so there is no {which} "
        "to fold the update into (a normalised weight with an update added is not the normalisation of any "
        f"weight); keep this adapter unmerged, or remove the parametrization from the base model before "
        f"fxlora.transform ({fix}: the weight becomes a plain parameter), then merge"
    )


def check_mergeable(name: str, module: nn.Module, adapter: str) -> None:
    """Raise `MergeError` if `adapter` on the layer `module` (called `name`) cannot be folded into
    its weights; return None if it can. Requires: `module` carries `adapter`."""
    meta = target_meta(module)
    where = _describe(name, module)
    obstacle = meta.kind.merge_obstacle(module)
    for path in meta.kind.merged_weights(module):
        owner, _, leaf = path.rpartition(".")
        obstacle = obstacle or _computed(module.get_submodule(owner), leaf)
    if obstacle is None and meta.adapters[adapter].lora_bias and getattr(module, "bias", None) is not None:
        obstacle = _computed(module, "bias")
    if obstacle is not None:
        raise MergeError(f"cannot merge adapter {adapter!r} into {where}: {obstacle}")
    if meta.adapters[adapter].lora_bias and getattr(module, "bias", None) is None:
        raise MergeError(
            f"cannot merge adapter {adapter!r} into {where}: the adapter has a bias (lora_bias=True) but "
            "the layer has none to fold it into; keep this adapter unmerged"
        )


def _factor(module: nn.Module, adapter: str, scale: float) -> float:
    return target_meta(module).adapters[adapter].scaling * float(scale)


def layer_tensor(module: nn.Module, path: str) -> torch.Tensor:
    """The layer's tensor at `path` (``"weight"``, ``"out_proj.weight"``, ``"bias"``)."""
    owner, _, leaf = path.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)


def delta_weight(
    module: nn.Module, adapter: str, scale: float = 1.0, dtype: Optional[torch.dtype] = None, which: str = "weight"
) -> torch.Tensor:
    """The update `adapter` adds to the layer's weight at path `which` (one of its kind's
    `merged_weights`; ``module.weight`` for all but kinds with several) at run-time scale `scale`,
    shaped like that weight, in `dtype` (default: `compute_dtype` of the weight and the adapter,
    at least float32).

    Requires: `check_mergeable` passed for (`module`, `adapter`)."""
    meta = target_meta(module)
    weight = layer_tensor(module, which)
    dtype = dtype or compute_dtype(weight, *meta.kind.weight_matrices(module, adapter)[which])
    product = meta.kind.lora_weight(module, adapter, meta.fan_in_fan_out, dtype, which)
    if product.shape != weight_shape(module, which):
        raise MergeError(
            f"adapter {adapter!r} gives an update of shape {tuple(product.shape)} for a weight of shape "
            f"{tuple(weight_shape(module, which))} on {type(module).__name__}; its fan_in_fan_out setting does not fit the layer"
        )
    return product * _factor(module, adapter, scale)


def delta_bias(module: nn.Module, adapter: str, scale: float = 1.0, dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """The update `adapter` adds to ``module.bias`` (``B.bias * scaling * scale``), or None when
    the adapter has no bias (``lora_bias=False``)."""
    meta = target_meta(module)
    b_bias = meta.kind.bias(module, adapter)
    if b_bias is None:
        return None
    dtype = dtype or compute_dtype(module.bias, b_bias)
    return b_bias.to(dtype) * _factor(module, adapter, scale)
