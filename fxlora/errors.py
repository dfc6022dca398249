"""Every exception fxlora raises on purpose, in one place.

Each says what is wrong and what would be valid; the operation that raised it left the model and
files as they were.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "CheckpointError",
    "MergeError",
    "NoTargetFoundError",
    "PassContractError",
    "TraceFailure",
    "UnsupportedFieldError",
    "UnsupportedTargetError",
    "VariantError",
]


class NoTargetFoundError(ValueError):
    """`target_modules` (or `modules_to_save`) matched no module of the model."""


class UnsupportedFieldError(ValueError, NotImplementedError):
    """A `LoraConfig` field of a PEFT feature fxlora does not implement was set to a value other
    than PEFT's default (the message names the field and the feature)."""


class UnsupportedTargetError(TypeError):
    """A module matched `target_modules` but its type cannot carry a LoRA adapter."""


class MergeError(ValueError):
    """An adapter cannot be folded into a layer's weights (the message says which and why)."""


class VariantError(ValueError):
    """An operation the adapter's variant does not allow (the message names both)."""


class CheckpointError(ValueError):
    """An adapter directory that cannot be read, or that does not fit the model it is loaded on."""


class TraceFailure(Exception):
    """A module (or one call pattern of it) cannot be captured as a graph."""


class PassContractError(AssertionError):
    """A graph does not meet a pass's requirement, or a pass did not deliver its guarantee."""

    def __init__(self, pass_name: str, clause: str, condition: str, node: Optional[Any] = None) -> None:
        self.pass_name, self.clause, self.condition, self.node = pass_name, clause, condition, node
        where = "" if node is None else f" (violated at node {node.name!r}: {node.format_node()})"
        super().__init__(f"{pass_name} {clause}: {condition}{where}")
