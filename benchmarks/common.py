"""Timing helpers shared by the benchmarks: interleaved rounds, so machine drift hits every
contender alike, and medians, so one slow round does not decide a ratio."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 15, inner: int = 3, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timing them in turn, round after round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def train_step(model: torch.nn.Module, x: torch.Tensor, loss_fn: Callable, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A closure doing forward + backward + optimizer step."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        optimizer.step()

    return step


def forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
