"""What the torchrun scripts share: the gloo process group, rank 0's result, the block model."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from launcher import RESULT_ENV


@contextlib.contextmanager
def process_group(timeout_s: float = 60) -> Iterator[tuple[int, int]]:
    """A gloo process group for the block (rank, world size); a collective that waits longer
    than `timeout_s` raises instead of hanging."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def write_result(result: Any) -> None:
    """Rank 0 (or a single process): write `result` as JSON where the launcher reads it."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(result))


def gather(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (on every rank)."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class Block(nn.Module):
    """A pre-norm residual block: LayerNorm, then two Linears."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Blocks(nn.Module):
    """`Block`s in a ModuleList and a head."""

    def __init__(self, d: int = 16, n: int = 2, out: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)
