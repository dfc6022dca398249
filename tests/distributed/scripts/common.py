"""What the torchrun scripts share: the gloo process group, rank 0's result, gathering."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist

from launcher import RESULT_ENV


@contextlib.contextmanager
def process_group(timeout_s: float = 60) -> Iterator[tuple[int, int]]:
    """A gloo process group for the `with` block, yielding (rank, world size); a collective that
    waits longer than `timeout_s` raises instead of hanging."""
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
