"""Stacked adapter weights of a linear layer, for serving mixed batches eagerly.

Serving a mixed batch (every row with its own adapter), each adapted linear layer computes its
adapters' updates with batched matmuls over the adapters (`fxlora.ops.grouped_linear_update`),
which read the adapters' weights stacked. Stacking them on every call would copy them on every
layer and call, so each layer keeps its stack (`layer_stack`, on the layer's
`fxlora.layers.TargetMeta`) and rebuilds it only when one of its sources changed in place
(``Tensor._version``) or was replaced, or the adapters changed.

A stack is computed data, out of ``state_dict()``, made on the first mixed batch a layer serves:
it takes the memory of one more copy of the layer's adapter weights.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from .layers import target_meta

__all__ = ["AdapterStack", "layer_stack", "adapter_sources"]


class AdapterStack:
    """The A and B weights of a linear layer's adapters, stacked for batched matmuls over them.

    ``a`` ``(K, in, R)``: the K adapters' A weights transposed; ``b`` ``(K, R, out)``: their B
    weights transposed and times their scalings; ranks below the largest, R, padded with zeros.
    `adapters` names the K adapters in order.
    """

    def __init__(self, adapters: tuple[str, ...], sources: list[torch.Tensor], stamp: Optional[tuple]) -> None:
        count = len(adapters)
        lora_a, lora_b, scalings = sources[:count], sources[count : 2 * count], sources[2 * count :]
        rank = max(w.shape[0] for w in lora_a)
        with torch.no_grad():
            self.a = lora_a[0].new_zeros(count, lora_a[0].shape[1], rank)
            self.b = lora_b[0].new_zeros(count, rank, lora_b[0].shape[0])
            for i, (wa, wb, s) in enumerate(zip(lora_a, lora_b, scalings)):
                self.a[i, :, : wa.shape[0]] = wa.t()
                self.b[i, : wb.shape[1]] = (wb * s.to(wb.dtype)).t()
        self.adapters = adapters
        self.stamp = stamp

    def __getstate__(self) -> dict:
        return {"a": None, "b": None, "adapters": self.adapters, "stamp": None}  # rebuilt on first use


def layer_stack(layer: nn.Module, adapters: tuple[str, ...]) -> AdapterStack:
    """The up-to-date stack of `adapters` on the adapted `layer`, kept on its `TargetMeta` and
    rebuilt only when a source changed or was replaced, or the adapters differ from the last
    call's."""
    meta = target_meta(layer)
    sources = adapter_sources(layer, adapters)
    try:
        stamp = (adapters, tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in sources))
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version
        stamp = None
    stack = meta.stack
    if stack is None or stamp is None or stack.stamp != stamp:
        stack = meta.stack = AdapterStack(adapters, sources, stamp)
    return stack


def adapter_sources(layer: nn.Module, adapters: Iterable[str]) -> list[torch.Tensor]:
    """``[A_1, ..., A_K, B_1, ..., B_K, scaling_1, ..., scaling_K]`` of a layer's adapters (the
    weights of its ``lora_A`` / ``lora_B`` modules and its ``lora_scaling`` tensors)."""
    adapters = tuple(adapters)
    children = layer._modules
    found = []
    for holder in (children["lora_A"]._modules, children["lora_B"]._modules):
        for adapter in adapters:
            module = holder[adapter]
            weight = module._parameters.get("weight")
            found.append(module.weight if weight is None else weight)
    scalings = children["lora_scaling"]._buffers
    return found + [scalings[a] for a in adapters]

