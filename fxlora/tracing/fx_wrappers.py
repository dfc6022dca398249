"""torch.fx's leaf-function wrappers, built once per function instead of once per trace.

On every trace torch.fx patches each ``fx.wrap``-registered function and each ``math`` function
(about 75 in a process with fxlora, timm and torchvision loaded) with a fresh wrapper from
``torch.fx._symbolic_trace._create_wrapped_func``, and restores the originals when the trace ends.
Building those wrappers (``functools.wraps`` each) is a large part of the fixed cost of a trace:
a plain torch.fx trace of the 6-module seed MLP takes 1.1-1.3 ms building them and 0.7-0.8 ms
reusing them.

A wrapper closes over its original function and nothing else, so the one built for a function
serves every later trace as well: `reused_wrappers` lends torch.fx a memoizing builder while a
fxlora trace runs. The patching and restoring stay torch.fx's own, so what a trace records and
what the process sees after it are unchanged. Where this torch has no such builder, traces build
their wrappers as before.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch.fx._symbolic_trace as _symbolic_trace

__all__ = ["reused_wrappers"]

_BUILDER = "_create_wrapped_func"
_LOCK = threading.Lock()
_ORIGINAL: Callable[[Callable], Callable] | None = getattr(_symbolic_trace, _BUILDER, None)
#: id of an original function -> (the original, kept alive so the id stays its own; its wrapper)
_BUILT: dict[int, tuple[Callable, Callable]] = {}
_active = 0


def _built_once(orig_fn: Callable) -> Callable:
    """torch.fx's wrapper for `orig_fn`, built on first use."""
    entry = _BUILT.get(id(orig_fn))
    if entry is None or entry[0] is not orig_fn:
        entry = (orig_fn, _ORIGINAL(orig_fn))
        _BUILT[id(orig_fn)] = entry
    return entry[1]


@contextlib.contextmanager
def reused_wrappers() -> Iterator[None]:
    """While the block runs, torch.fx reuses the wrapper it built for a function in an earlier trace.

    Blocks may nest and run in several threads at once: the builder is lent while any block runs
    and torch.fx's own is back when the last one ends.
    """
    global _active
    if _ORIGINAL is None or getattr(_symbolic_trace, _BUILDER, None) not in (_ORIGINAL, _built_once):
        yield  # another torch.fx, or someone else's patch: leave it alone
        return
    with _LOCK:
        _active += 1
        setattr(_symbolic_trace, _BUILDER, _built_once)
    try:
        yield
    finally:
        with _LOCK:
            _active -= 1
            if not _active:
                setattr(_symbolic_trace, _BUILDER, _ORIGINAL)
