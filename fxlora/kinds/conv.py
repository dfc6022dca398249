"""The ``conv`` kind: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A is a convolution in -> r with the base layer's kernel, stride, padding, dilation and padding
mode (PEFT drops the last two: a dilated conv crashes, reflect padding merges wrongly); B is a
1x..x1 convolution r -> out with the base's ``groups`` (PEFT's layout). The composition is one
convolution with the base's geometry and the kernel ``delta[o, i, ...] = sum_j B[o, j] * A[j, i, ...]``,
shape (out, in, *kernel). A grouped base cannot take it: its kernel only connects channels within a
group, while the update connects every input channel to every output channel.

A layer whose class has its own forward (timm's ``Conv2dSame``, ``StdConv2d``, ...) gets A and B
of its own class, as PEFT builds them (`fxlora.kinds.subclasses`): their tensors (``lora_A.gain``
of a ``ScaledStdConv2d`` included) are the adapter's, in fxlora's state and in the adapter file.
It takes a merge or a weighted combination only where its forward is declared linear in the weight.

`ConvKind` is also the base of the ``conv_transpose`` kind, which differs only in A.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn as nn
from torch.nn.utils.parametrize import type_before_parametrizations

from fxlora.kinds.registry import register_kind
from fxlora.kinds.low_rank import ModulePairKind
from fxlora.kinds.subclasses import check_own_class_factors, has_own_forward, is_declared_linear, own_class_factors, own_forward_merge_obstacle

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = ["CONV", "ConvKind"]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvKind(ModulePairKind):
    name = "conv"
    layer_types = "nn.Conv1d, nn.Conv2d, nn.Conv3d"
    #: the layer classes of this kind, by number of spatial dimensions
    classes: dict[int, type] = _CONVS
    #: what their forward computes from the weight, for messages
    op = "a convolution"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, tuple(self.classes.values()))

    def own_forward(self, module: nn.Module) -> bool:
        """The layer's class has a forward of its own (`fxlora.kinds.subclasses`)."""
        return has_own_forward(module, self.classes.values())

    def check_spec(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        if spec.r % module.groups != 0:  # a grouped B splits the rank evenly over the groups
            raise ValueError(
                f"rank {spec.r} of {where} is not divisible by its groups={module.groups}; choose a rank that is "
                "a multiple of the layer's groups (rank_pattern sets it per layer) or exclude the layer"
            )
        if self.own_forward(module):
            self.check_own_factors(where, module, spec)

    # ---------------------------------------------------------------- A, the part a subclass changes
    def a_shape(self, module: nn.Module, r: int) -> tuple[int, ...]:
        return (r, module.in_channels, *module.kernel_size)

    def a_geometry(self, module: nn.Module) -> dict[str, Any]:
        """The base's settings A is built with (besides its kernel size)."""
        return dict(stride=module.stride, padding=module.padding, dilation=module.dilation, padding_mode=module.padding_mode)

    def a_module(self, module: nn.Module, r: int) -> nn.Module:
        """A: in -> r, a layer of the base's class family with the base's kernel and geometry."""
        cls = self.classes[len(module.kernel_size)]
        return cls(module.in_channels, r, kernel_size=module.kernel_size, bias=False, **self.a_geometry(module))

    def own_factors(self, where: str, module: nn.Module, spec: "AdapterSpec") -> tuple[nn.Module, nn.Module]:
        """(A, B) of a layer whose class has its own forward: of that class, as PEFT builds them
        (`fxlora.kinds.subclasses.own_class_factors`); `UnsupportedTargetError` where they cannot be."""
        return own_class_factors(where, module, spec.r, module.groups, spec.lora_bias)

    def check_own_factors(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        """`UnsupportedTargetError` unless `own_factors` builds factors that run (checked on the meta device)."""
        check_own_class_factors(where, module, spec.r, module.groups, spec.lora_bias)

    # ---------------------------------------------------------------- the rest
    def factor_shapes(self, module: nn.Module, spec: "AdapterSpec") -> dict[str, tuple[int, ...]]:
        if self.own_forward(module):
            with torch.device("meta"):
                factors = self.own_factors(f"a {type(module).__name__} layer", module, spec)
            return {f"{holder}.{n}": tuple(p.shape) for holder, f in zip(("lora_A", "lora_B"), factors) for n, p in f.named_parameters()}
        dims = len(module.kernel_size)
        shapes = {
            "lora_A.weight": self.a_shape(module, spec.r),
            "lora_B.weight": (module.out_channels, spec.r // module.groups, *(1,) * dims),
        }
        if spec.lora_bias:
            shapes["lora_B.bias"] = (module.out_channels,)
        return self.shapes_with_magnitude(module, spec, shapes)

    def factor_modules(self, module: nn.Module, spec: "AdapterSpec") -> tuple[nn.Module, nn.Module]:
        if self.own_forward(module):
            return self.own_factors(f"a {type(module).__name__} layer", module, spec)
        lora_a = self.a_module(module, spec.r)
        dims = len(module.kernel_size)
        lora_b = _CONVS[dims](spec.r, module.out_channels, kernel_size=(1,) * dims, groups=module.groups, bias=spec.lora_bias)
        return lora_a, lora_b

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        return matrix.view(matrix.shape[0], -1, *module.kernel_size)

    def merge_obstacle(self, module: nn.Module) -> Optional[str]:
        own = own_forward_merge_obstacle(module, self.classes.values(), self.op)
        if own is not None:
            return own
        if module.groups == 1:
            return None
        return (
            f"the layer is a grouped convolution (groups={module.groups}) and a LoRA update connects every input "
            "channel to every output channel, which a grouped kernel cannot hold; keep this adapter unmerged, or "
            "exclude the layer (exclude_modules) if you need merged weights"
        )

    def combine_obstacle(self, module: nn.Module, combination: str) -> Optional[str]:
        """A layer with its own forward not declared linear has factors of its class, whose
        output is not linear in their weights: a combination of the weights is no combination
        of the updates. 'cat' and 'svd' build B as one (out, rank) matrix, which a grouped B
        cannot hold."""
        cls = type_before_parametrizations(module)
        if self.own_forward(module) and not is_declared_linear(cls):
            return (
                f"the factors of {cls.__name__} layers are {cls.__name__} layers, whose output is not linear in "
                "their weights (fxlora.kinds.declare_linear_forward declares a class that is), so combining their "
                "weights does not combine the adapters' updates; combine adapters of other layers only"
            )
        if module.groups == 1 or combination == "linear":
            return None
        return (
            f"combination {combination!r} cannot combine adapters of a grouped convolution (groups={module.groups}); "
            "use combination_type='linear' (equal ranks), or combine adapters of ungrouped layers only"
        )


    # ---------------------------------------------------------------- DoRA
    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        if self.own_forward(module):  # its weight term (with dropout) would need its own forward's padding
            return f"DoRA is implemented for {self.layer_types} themselves, not for subclasses with a forward of their own ({type(module).__name__})"
        return self.merge_obstacle(module)

    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (1, module.out_channels, *(1,) * len(module.kernel_size))

    def dora_norm(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(1, 0)

    def dora_on_weight(self, module: nn.Module, values: torch.Tensor) -> torch.Tensor:
        return values.transpose(1, 0)

    def without_bias(self, module: nn.Module, base: torch.Tensor) -> torch.Tensor:
        bias = module.bias
        return base if bias is None else base - bias.view(-1, *(1,) * len(module.kernel_size))

    def weight_term(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return module._conv_forward(x, weight, None)


CONV = register_kind(ConvKind())
