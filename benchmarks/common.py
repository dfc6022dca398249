"""Timing helpers shared by the benchmarks: interleaved rounds, so machine drift hits every
contender alike, and medians, so one slow round does not decide a ratio."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def interleaved_samples(
    fns: dict[str, Callable[[], object]], rounds: int = 15, inner: int = 3, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, timing them in turn, round after
    round."""
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
    return samples


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 15, inner: int = 3, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timing them in turn, round after round."""
    samples = interleaved_samples(fns, rounds, inner, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def paired_ratios(samples: dict[str, list[float]], reference: str) -> dict[str, tuple[float, float]]:
    """Each function's time over `reference`'s: the median of the per-round ratios (the two were
    timed next to each other, so drift cancels) and the ratio of the fastest rounds (on a shared
    machine interference only ever slows a round down)."""
    base = samples[reference]
    return {
        name: (statistics.median(a / b for a, b in zip(values, base)), min(values) / min(base))
        for name, values in samples.items()
    }


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


class PeakMemory:
    """Peak bytes of tensor storage allocated while the block runs (CPU-friendly: it follows
    every op's outputs through a dispatch mode and frees them when their last tensor dies).
    Storage that existed before the block (weights, optimizer state) is not counted."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def _track(self, tensor: torch.Tensor) -> None:
        import weakref

        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def __enter__(self) -> "PeakMemory":
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def peak_memory(fn: Callable[[], object], warmup: int = 2) -> int:
    """Peak extra bytes of one call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    gc.collect()
    with PeakMemory() as tracker:
        fn()
    return tracker.peak
