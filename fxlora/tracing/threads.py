"""Which thread is tracing: torch.fx patches process-wide state only for the tracing thread's sake.

While it traces, torch.fx patches module calls and attribute reads for the whole process
(``nn.Module.__call__`` and ``__getattr__``, or where `fxlora.tracing.fx_module_patches` puts
them), and fxlora patches a few library functions (``torch.utils.checkpoint``'s entry
points, transformers' attention lookup). Every one of those patches asks `tracing_here` and lets
calls from other threads through untouched, so tracing one model never disturbs another thread's
forward (`fxlora.runtime.calls.CALL_LOCK` keeps forwards of fxlora models and tracing apart as well).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["tracing_here", "tracing_in_this_thread"]

_TRACING = threading.local()


def tracing_here() -> bool:
    """Whether this thread is inside a fxlora trace right now."""
    return getattr(_TRACING, "depth", 0) > 0


@contextlib.contextmanager
def tracing_in_this_thread() -> Iterator[None]:
    """Mark this thread as tracing for the duration of the block (nested blocks count)."""
    _TRACING.depth = getattr(_TRACING, "depth", 0) + 1
    try:
        yield
    finally:
        _TRACING.depth -= 1
