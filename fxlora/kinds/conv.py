"""The ``conv`` kind: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A is a convolution in -> r with the base layer's kernel, stride, padding, dilation and padding
mode (PEFT drops the last two: a dilated conv crashes, reflect padding merges wrongly); B is a
1x..x1 convolution r -> out with the base's ``groups`` (PEFT's layout). The composition is one
convolution with the base's geometry and the kernel ``delta[o, i, ...] = sum_j B[o, j] * A[j, i, ...]``,
shape (out, in, *kernel). A grouped base cannot take it: its kernel only connects channels within a
group, while the update connects every input channel to every output channel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from . import register_kind
from .low_rank import ModulePairKind, check_rank_divides_groups

if TYPE_CHECKING:
    from ..layers import AdapterSpec

__all__ = ["CONV", "grouped_merge_obstacle", "grouped_combine_obstacle", "pointwise_b"]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def grouped_merge_obstacle(module: nn.Module) -> Optional[str]:
    """Why a grouped convolution (plain or transposed) cannot take a LoRA update, or None."""
    if module.groups == 1:
        return None
    return (
        f"the layer is a grouped convolution (groups={module.groups}) and a LoRA update connects every input "
        "channel to every output channel, which a grouped kernel cannot hold; keep this adapter unmerged, or "
        "exclude the layer (exclude_modules) if you need merged weights"
    )


def grouped_combine_obstacle(module: nn.Module, combination: str) -> Optional[str]:
    """'cat' and 'svd' build B as one (out, rank) matrix, which a grouped B cannot hold."""
    if module.groups == 1 or combination == "linear":
        return None
    return (
        f"combination {combination!r} cannot combine adapters of a grouped convolution (groups={module.groups}); "
        "use combination_type='linear' (equal ranks), or combine adapters of ungrouped layers only"
    )


def pointwise_b(spec: "AdapterSpec", module: nn.Module) -> nn.Module:
    """B: a 1x..x1 convolution r -> out with the base's groups."""
    dims = len(module.kernel_size)
    return _CONVS[dims](spec.r, module.out_channels, kernel_size=(1,) * dims, groups=module.groups, bias=spec.lora_bias)


class ConvKind(ModulePairKind):
    name = "conv"
    layer_types = "nn.Conv1d, nn.Conv2d, nn.Conv3d"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, tuple(_CONVS.values()))

    def check_spec(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        check_rank_divides_groups(where, module, spec)

    def factor_shapes(self, module: nn.Module, spec: "AdapterSpec") -> dict[str, tuple[int, ...]]:
        kernel = tuple(module.kernel_size)
        shapes = {
            "lora_A.weight": (spec.r, module.in_channels, *kernel),
            "lora_B.weight": (module.out_channels, spec.r // module.groups, *(1,) * len(kernel)),
        }
        if spec.lora_bias:
            shapes["lora_B.bias"] = (module.out_channels,)
        return shapes

    def factor_modules(self, module: nn.Module, spec: "AdapterSpec") -> tuple[nn.Module, nn.Module]:
        lora_a = _CONVS[len(module.kernel_size)](
            module.in_channels,
            spec.r,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            padding_mode=module.padding_mode,
            bias=False,
        )
        return lora_a, pointwise_b(spec, module)

    def merge_obstacle(self, module: nn.Module) -> Optional[str]:
        return grouped_merge_obstacle(module)

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        return matrix.view(matrix.shape[0], -1, *module.kernel_size)

    def combine_obstacle(self, module: nn.Module, combination: str) -> Optional[str]:
        return grouped_combine_obstacle(module, combination)


CONV = register_kind(ConvKind())
