"""The ``conv_transpose`` kind: ``nn.ConvTranspose1d`` / ``nn.ConvTranspose2d`` / ``nn.ConvTranspose3d``.

No peer library adapts these; fxlora's arrangement mirrors the ``conv`` kind so that the update is
one transposed convolution with the base layer's geometry:

- A is a transposed convolution in -> r with the base's kernel, stride, padding, output_padding and
  dilation; its weight is stored the transposed way, (in, r, *kernel);
- B is a 1x..x1 convolution r -> out with the base's ``groups``, weight (out, r / groups, 1, ..).

A pointwise map after a transposed convolution is the transposed convolution with the mapped
kernel, so (groups == 1) ``B(A(x)) = conv_transpose(x, delta)`` with
``delta[i, o, ...] = sum_j B[o, j] * A[i, j, ...]``, shape (in, out, *kernel): exactly the base's
weight layout, so merges fold it in exactly. A grouped base cannot take it (its kernel connects
channels within a group only), as for grouped convolutions.

``forward(x, output_size=...)``: the requested size picks the output padding; A runs with the
output padding that gives the spatial size of the base's output (`sized_like`), so it always
produces the shape the base produced.

A layer whose class has its own forward is refused at transform: no peer library defines what its
factors would be, and fxlora cannot tell what its forward computes.

Init: A kaiming-uniform with ``a=sqrt(5)`` over its fan-in in * prod(kernel) (PyTorch's own init of
a transposed convolution would use r * prod(kernel)), so A starts like the ``conv`` kind's A; B zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxlora.errors import UnsupportedTargetError
from fxlora.kinds.registry import KindBase, register_kind
from fxlora.kinds.conv import ConvKind

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = ["CONV_TRANSPOSE"]

_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_FUNCTIONAL = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def sized_like(lora_a: nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """A's output for `x` with the spatial size of `base` (the base's output, whose size its
    ``output_padding`` or a call's ``output_size`` chose): A runs with the output padding that
    gives that size. (``output_size=`` cannot stand in: it only reaches sizes below the smallest
    plus the stride, while an output padding may reach up to the dilation.)"""
    dims = len(lora_a.kernel_size)
    geometry = zip(x.shape[-dims:], lora_a.stride, lora_a.padding, lora_a.dilation, lora_a.kernel_size)
    smallest = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k in geometry]
    padding = [size - low for size, low in zip(base.shape[-dims:], smallest)]
    return _FUNCTIONAL[dims](x, lora_a.weight, None, lora_a.stride, lora_a.padding, padding, 1, lora_a.dilation)


torch.fx.wrap("sized_like")  # one opaque node when the update is traced


class ConvTransposeKind(ConvKind):
    """The ``conv`` kind with a transposed A (B, merge and combination rules are the same)."""

    name = "conv_transpose"
    layer_types = "nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d"
    classes = _TRANSPOSED
    op = "a transposed convolution"

    def a_shape(self, module: nn.Module, r: int) -> tuple[int, ...]:
        return (module.in_channels, r, *module.kernel_size)

    def a_geometry(self, module: nn.Module) -> dict[str, Any]:
        return dict(stride=module.stride, padding=module.padding, output_padding=module.output_padding, dilation=module.dilation)

    def check_own_factors(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        self.own_factors(where, module, spec)

    def own_factors(self, where: str, module: nn.Module, spec: "AdapterSpec") -> tuple[nn.Module, nn.Module]:
        cls = type(module).__name__
        raise UnsupportedTargetError(
            f"cannot adapt {where} ({cls}): {cls} is a transposed convolution with its own forward, which fxlora "
            "cannot tell the computation of, and no peer library defines LoRA factors for; exclude the layer "
            "(exclude_modules), or adapt a layer of a plain nn.ConvTranspose1d/2d/3d"
        )

    def a_view(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1)  # (in, r, *kernel) -> (r, in, *kernel)

    def call_a(self, lora_a: nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return sized_like(lora_a, x, base)

    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        return KindBase.dora_obstacle(self, module)  # PEFT has no DoRA for transposed convolutions either

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        return super().weight_from_matrix(module, matrix, fan_in_fan_out).transpose(0, 1).contiguous()


CONV_TRANSPOSE = register_kind(ConvTransposeKind())
