"""The ``linear`` kind: ``nn.Linear`` and transformers' ``Conv1D``.

A is ``nn.Linear(in, r)``, B is ``nn.Linear(r, out)`` (with a bias for ``lora_bias``); the update
``B @ A`` is an (out, in) matrix. ``Conv1D`` (GPT-2) stores its weight as (in, out)
(``fan_in_fan_out``), so its delta is ``(B @ A).T``. The only stackable kind: its A and B are
plain matrices, so several adapters run as two matmuls (`fxlora.core.ops.stacked_linear_update`).

A subclass with its own forward keeps plain ``nn.Linear`` factors (as PEFT's do), and takes a merge
only where its forward is declared linear in the weight (`fxlora.kinds.subclasses`: timm's
``Linear`` is).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxlora.kinds.hf_classes import hf_conv1d_forward_owner, is_hf_conv1d
from fxlora.kinds.quantized import quantization_of
from fxlora.kinds.subclasses import own_forward_merge_obstacle
from fxlora.kinds.registry import register_kind
from fxlora.kinds.low_rank import ModulePairKind

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = ["LINEAR"]


def _in_out(module: nn.Module) -> tuple[int, int]:
    if is_hf_conv1d(module):
        rows, cols = module.weight.shape
        return rows, cols
    return module.in_features, module.out_features


class LinearKind(ModulePairKind):
    name = "linear"
    layer_types = "nn.Linear, transformers Conv1D"
    all_linear = True
    stackable = True
    takes_weight_inits = True

    def matches(self, module: nn.Module) -> bool:
        return (isinstance(module, nn.Linear) or is_hf_conv1d(module)) and quantization_of(module) is None

    def fan_in_fan_out(self, module: nn.Module) -> Optional[bool]:
        return is_hf_conv1d(module)

    def factor_shapes(self, module: nn.Module, spec: "AdapterSpec") -> dict[str, tuple[int, ...]]:
        n_in, n_out = _in_out(module)
        shapes = {"lora_A.weight": (spec.r, n_in), "lora_B.weight": (n_out, spec.r)}
        if spec.lora_bias:
            shapes["lora_B.bias"] = (n_out,)
        return self.shapes_with_magnitude(module, spec, shapes)

    def factor_modules(self, module: nn.Module, spec: "AdapterSpec") -> tuple[nn.Module, nn.Module]:
        n_in, n_out = _in_out(module)
        return nn.Linear(n_in, spec.r, bias=False), nn.Linear(spec.r, n_out, bias=spec.lora_bias)

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        return matrix.T if fan_in_fan_out else matrix

    def merge_obstacle(self, module: nn.Module) -> Optional[str]:
        if is_hf_conv1d(module):
            return own_forward_merge_obstacle(module, [hf_conv1d_forward_owner(module)], "a matrix product")
        return own_forward_merge_obstacle(module, [nn.Linear], "F.linear")


    # ---------------------------------------------------------------- DoRA
    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (_in_out(module)[1],)

    def dora_norm(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight.T if is_hf_conv1d(module) else weight, dim=1)

    def dora_on_weight(self, module: nn.Module, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1) if is_hf_conv1d(module) else values.view(-1, 1)

    def weight_term(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight.T if is_hf_conv1d(module) else weight)


LINEAR = register_kind(LinearKind())
