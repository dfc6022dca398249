"""Tensor constructors and dtype facts on traced values: recorded as graph nodes, not refused.

Model code builds small tensors from sizes it reads (``torch.tensor(query.size(-1))``) and reads
a dtype's limits (``torch.finfo(scores.dtype).min``). With plain torch.fx both fail: neither
``torch.tensor`` nor ``torch.finfo`` dispatches on a proxy. While fxlora traces
(`proxy_aware_constructors`), each of them given a traced value records one ``call_function``
node instead, which computes the very same call on the real values when the graph runs, so the
result is exactly what the eager code computes. Called with plain values, both behave as always
(another thread's calls included).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx as fx

from fxlora.tracing.integrations import opaque

__all__ = ["proxy_aware_constructors", "finfo_value", "FINFO_FIELDS"]

FINFO_FIELDS = ("bits", "eps", "max", "min", "resolution", "smallest_normal", "tiny")


def finfo_value(dtype: torch.dtype, field: str) -> Any:
    """``getattr(torch.finfo(dtype), field)``: the node a traced ``torch.finfo(x.dtype).min`` becomes."""
    return getattr(torch.finfo(dtype), field)


class _TracedFinfo:
    """``torch.finfo`` of a traced dtype: each field read is a `finfo_value` node."""

    def __init__(self, dtype: fx.Proxy) -> None:
        self._dtype = dtype

    def __getattr__(self, field: str) -> Any:
        if field not in FINFO_FIELDS:
            raise AttributeError(f"torch.finfo has no attribute {field!r}")
        return self._dtype.tracer.create_proxy("call_function", finfo_value, (self._dtype, field), {})


@contextlib.contextmanager
def proxy_aware_constructors() -> Iterator[None]:
    """While active, ``torch.tensor`` and ``torch.finfo`` given traced values record nodes."""
    tensor, finfo = torch.tensor, torch.finfo

    def traced_finfo(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], fx.Proxy) and not kwargs:
            return _TracedFinfo(args[0])
        return finfo(*args, **kwargs)

    torch.tensor, torch.finfo = opaque(tensor), traced_finfo
    try:
        yield
    finally:
        torch.tensor, torch.finfo = tensor, finfo
