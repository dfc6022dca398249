"""Stacked adapter weights of a linear layer, for serving mixed batches eagerly.

Serving a mixed batch (every row with its own adapter), each adapted linear layer computes its
adapters' updates with batched matmuls over the adapters (`fxlora.core.ops.grouped_linear_update`),
which read the adapters' weights stacked. Stacking them on every call would copy them on every
layer and call, so each layer keeps its stack (`layer_stack`, on the layer's
`fxlora.core.layers.TargetMeta`) and rebuilds it only when one of its sources changed in place
(``Tensor._version``) or was replaced, or the adapters changed.

A stack is computed data, out of ``state_dict()``, made on the first mixed batch a layer serves:
it takes the memory of one more copy of the layer's adapter weights.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from fxlora.core.layers import target_meta

__all__ = ["AdapterStack", "layer_stack", "adapter_weights"]


class AdapterStack:
    """The A and B weights of a linear layer's adapters, stacked for batched matmuls over them.

    ``a`` ``(K, in, R)``: the K adapters' A weights transposed; ``b`` ``(K, R, out)``: their B
    weights transposed and times their scalings; ranks below the largest, R, padded with zeros.
    `adapters` names the K adapters in order.
    """

    def __init__(
        self,
        adapters: tuple[str, ...],
        weights: tuple[list[torch.Tensor], list[torch.Tensor]],
        scalings: tuple[float, ...],
        stamp: Optional[tuple],
    ) -> None:
        count = len(adapters)
        lora_a, lora_b = weights
        rank = max(w.shape[0] for w in lora_a)
        with torch.no_grad():
            self.a = lora_a[0].new_zeros(count, lora_a[0].shape[1], rank)
            self.b = lora_b[0].new_zeros(count, rank, lora_b[0].shape[0])
            for i, (wa, wb, s) in enumerate(zip(lora_a, lora_b, scalings)):
                self.a[i, :, : wa.shape[0]] = wa.t()
                self.b[i, : wb.shape[1]] = (wb * s).t()
        self.adapters = adapters
        self.stamp = stamp

    def __getstate__(self) -> dict:
        return {"a": None, "b": None, "adapters": self.adapters, "stamp": None}  # rebuilt on first use


def layer_stack(layer: nn.Module, adapters: tuple[str, ...], scalings: tuple[float, ...]) -> AdapterStack:
    """The up-to-date stack of `adapters` (with their `scalings`) on the adapted `layer`, kept on
    its `TargetMeta` and rebuilt only when a weight changed or was replaced, or the adapters
    differ from the last call's."""
    meta = target_meta(layer)
    weights = adapter_weights(layer, adapters)
    try:
        stamp = (adapters, scalings, tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in (*weights[0], *weights[1])))
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version
        stamp = None
    stack = meta.stack
    if stack is None or stamp is None or stack.stamp != stamp:
        stack = meta.stack = AdapterStack(adapters, weights, scalings, stamp)
    return stack


def adapter_weights(layer: nn.Module, adapters: Iterable[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``([A_1, ..., A_K], [B_1, ..., B_K])``: the weights of a layer's ``lora_A`` / ``lora_B``
    modules for `adapters`."""
    adapters = tuple(adapters)
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

