"""Adapter checkpoints in PEFT's format (save_pretrained / from_pretrained / load_adapter).

Mixin of `fxlora.LoraModel` (the checkpoint issue builds it out).
"""

from __future__ import annotations

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    pass
