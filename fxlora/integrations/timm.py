"""timm: the helpers timm itself declares untraceable stay opaque.

timm registers the functions that branch on shapes or values (``resample_abs_pos_embed``,
``window_partition`` helpers, ...) with ``register_notrace_function`` for its own fx feature
extractor; fxlora keeps them as single ``call_function`` nodes too, evaluated on the real values
when the graph runs. (timm's "notrace" *modules* need nothing: fxlora already leaves every module
without an adapted layer inside as one node, and one that contains adapted layers is traced
through or, if it cannot be, planned below.)

Imported only for models built from timm classes (`fxlora.integrations.hooks_for`).
"""

from __future__ import annotations

from ..integrations import TraceHooks

__all__ = ["trace_hooks"]


def trace_hooks() -> TraceHooks:
    try:
        from timm.layers import _fx
    except ImportError:  # pragma: no cover - very old timm
        return TraceHooks()
    functions = tuple(f for f in _fx.get_notrace_functions() if callable(f))
    return TraceHooks(leaf_functions=functions)
