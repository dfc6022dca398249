"""Recognising transformers classes without importing transformers.

A module is taken to be of a transformers class when a class of that name, defined in a
``transformers`` module, is among its bases (so subclasses count, and fxlora never imports
transformers for a model that does not use it).
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["is_hf_conv1d", "hf_conv1d_forward_owner", "is_pretrained_model"]


def _has_transformers_base(module: nn.Module, class_name: str) -> bool:
    return any(
        cls.__name__ == class_name and cls.__module__.startswith("transformers")
        for cls in type(module).__mro__
    )


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (a linear layer whose weight is (in, out))."""
    return _has_transformers_base(module, "Conv1D")


def hf_conv1d_forward_owner(module: nn.Module) -> type:
    """transformers' own ``Conv1D`` class among `module`'s bases (whose forward is the known one).
    Requires: `is_hf_conv1d(module)`."""
    return next(
        cls for cls in type(module).__mro__ if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
    )


def is_pretrained_model(module: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return _has_transformers_base(module, "PreTrainedModel")
