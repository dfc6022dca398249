"""Python's cyclic garbage collector paused while fxlora plans and builds code.

Planning (`fxlora.planning.plan.make_plan`) and building (`fxlora.runtime.forwards`) create
tens of thousands of short-lived objects (fx nodes, proxies, generated code); each few hundred
allocations start a collection that walks every young object, and now and then every object of
the process (a model already in memory included). `collection_paused` pauses the collector
for such a step and starts it again afterwards (only if it was running: a program that turned
it off keeps it off). Nothing is leaked: the garbage made meanwhile is collected on the
collector's next run, as it would have been.

Thread-safe and nestable: the collector runs again when the last of the overlapping pauses
ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

__all__ = ["collection_paused"]

_lock = threading.Lock()
_depth = 0
_resume = False  # whether the collector was running when the outermost pause began


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Pause the cyclic collector for the block (see the module docstring)."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
