"""Which layer types fxlora can adapt, and how each kind is described.

A *kind* decides the shape of the LoRA branch:

- ``"linear"``: ``nn.Linear`` and transformers ``Conv1D`` (weight stored (in, out), i.e. fan_in_fan_out);
- ``"conv"``: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``;
- ``"embedding"``: ``nn.Embedding``.

Subclasses count as their base type (``NonDynamicallyQuantizableLinear`` is a Linear).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

__all__ = ["layer_kind", "is_hf_conv1d", "is_pretrained_model", "SUPPORTED_TYPES", "in_out_features"]

SUPPORTED_TYPES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding and transformers Conv1D"


def _has_transformers_base(module: nn.Module, class_name: str) -> bool:
    return any(
        cls.__name__ == class_name and cls.__module__.startswith("transformers")
        for cls in type(module).__mro__
    )


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a linear layer whose weight is (in, out))."""
    return _has_transformers_base(module, "Conv1D")


def is_pretrained_model(module: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return _has_transformers_base(module, "PreTrainedModel")


def layer_kind(module: nn.Module) -> Optional[str]:
    """``"linear"``, ``"conv"``, ``"embedding"``, or None when fxlora cannot adapt the module."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) sizes of a supported layer: features, channels, or (num_embeddings, embedding_dim)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        rows, cols = module.weight.shape
        return rows, cols
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    raise TypeError(f"{type(module).__name__} is not a supported layer type ({SUPPORTED_TYPES})")
