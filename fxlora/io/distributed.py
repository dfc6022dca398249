"""Adapter files of sharded models (FSDP2, DTensor parameters).

Saving: every process calls ``save_pretrained`` (gathering a sharded tensor is collective) and
one process writes, the main one (rank 0 unless told otherwise), as for an unsharded model.
Loading: every process reads the same file and keeps its own shard of each sharded tensor; no
communication.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["is_sharded", "full_tensor", "copy_into", "writes_files", "user_class"]


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of `tensor` (a collective for a sharded one: every process must call)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where `value` is the whole tensor and `target` may be sharded
    (then its own shard of `value` is copied, with no communication)."""
    if is_sharded(target):
        value = value.to(dtype=target.dtype, device=target.device)
        target.copy_(distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None))
    else:
        target.copy_(value)


def writes_files(is_main_process: Optional[bool]) -> bool:
    """Whether this process writes: `is_main_process` if given, else rank 0 of the default
    process group (every process when none is initialised)."""
    if is_main_process is not None:
        return bool(is_main_process)
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def user_class(cls: type) -> type:
    """The model's own class: the first in `cls`'s MRO not made by torch.distributed (FSDP2's
    ``fully_shard`` gives a module the class ``FSDP<Name>``)."""
    return next((c for c in cls.__mro__ if not c.__module__.startswith("torch.distributed")), cls)
