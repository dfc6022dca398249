"""The ``quantized_linear`` kind: linear layers whose weight is stored quantized (QLoRA bases).

An ``nn.Linear`` with a torchao-quantized weight (``quantize_`` with ``Int8WeightOnlyConfig``,
``IntxWeightOnlyConfig``, ..., or an ``NF4Tensor`` from ``to_nf4``) or a bitsandbytes
``Linear8bitLt`` / ``Linear4bit`` (`fxlora.kinds.quantized`). The adapter is the ``linear`` kind's
(plain ``nn.Linear`` factors, in the compute dtype: float32 for an int8/int4 storage or a
half-precision base, as PEFT does), so training, stacking and mixed batches are the same. What
differs is everything that reads or writes the weight:

- merging dequantizes, adds the update, requantizes, and keeps the original weight so that an
  unmerge restores it bit for bit (`fxlora.core.fold`); the merged weight is rounded again;
- DoRA is refused: its magnitude and norm need the dequantized weight in every step, which fxlora
  has not implemented or tested on quantized bases;
- PiSSA / OLoRA / orthogonal inits are refused: they rewrite the base weight.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from fxlora.kinds.linear import LinearKind
from fxlora.kinds.quantized import quantization_of
from fxlora.kinds.registry import register_kind

__all__ = ["QUANTIZED_LINEAR"]


class QuantizedLinearKind(LinearKind):
    name = "quantized_linear"
    layer_types = "nn.Linear with a torchao-quantized weight, bitsandbytes Linear8bitLt / Linear4bit"
    takes_weight_inits = False

    def matches(self, module: nn.Module) -> bool:
        return quantization_of(module) is not None

    def fan_in_fan_out(self, module: nn.Module) -> Optional[bool]:
        return False

    def merge_obstacle(self, module: nn.Module) -> Optional[str]:
        return None  # the layer is linear in its dequantized weight; requantizing is `fxlora.core.fold`'s

    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        return (
            f"its weight is quantized ({quantization_of(module).describe(module)}); fxlora does not implement "
            "DoRA on quantized bases (its weight norm would have to be taken of the dequantized weight in every "
            "step); use plain LoRA on these layers, or exclude them (exclude_modules)"
        )


QUANTIZED_LINEAR = register_kind(QuantizedLinearKind())
