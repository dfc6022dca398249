"""fxlora's dtype rules, in one place.

- Adapters of a half-precision base are float32 (PEFT's rule, `adapter_dtype`).
- A branch casts the layer's input to its adapter's dtype (`cast_like`) and rounds its update
  into the base output's dtype once.
- Merge arithmetic is float32, or wider when a tensor is (`compute_dtype`), rounded once into the
  weight's dtype.
"""

from __future__ import annotations

import torch

__all__ = ["adapter_dtype", "cast_like", "compute_dtype"]


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """PEFT's rule: adapters are float32 for fp16/bf16 bases, else the base's floating dtype."""
    if base_weight.dtype in (torch.float16, torch.bfloat16) or not base_weight.dtype.is_floating_point:
        return torch.float32
    return base_weight.dtype


def cast_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`x` in `ref`'s dtype (no copy when it already is)."""
    return x if x.dtype == ref.dtype else x.to(ref.dtype)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or the widest floating dtype among `tensors` when that is wider (float64)."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype.is_floating_point:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype
