"""timm: the helpers timm itself declares untraceable stay opaque, and timm's containers are not roots.

timm registers the functions that branch on shapes or values (``resample_abs_pos_embed``,
``window_partition`` helpers, ...) with ``register_notrace_function`` for its own fx feature
extractor; fxlora keeps them as single ``call_function`` nodes too, evaluated on the real values
when the graph runs. (timm's "notrace" *modules* need nothing: fxlora already leaves every module
without an adapted layer inside as one node, and one that contains adapted layers is traced
through or, if it cannot be, planned below.)

timm calls the children of its ``nn.Sequential`` containers one by one in ``checkpoint_seq``
(gradient checkpointing) and ``forward_intermediates``; such a container is therefore never made
a graph root of its own (`refuse_sequential_root`): its blocks are, or the model around it.

Imported only for models built from timm classes (`fxlora.integrations.hooks_for`).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..integrations import TraceHooks

__all__ = ["trace_hooks", "refuse_sequential_root"]


def refuse_sequential_root(module: nn.Module) -> Optional[str]:
    if type(module) is nn.Sequential:
        return "timm may call this nn.Sequential's children one by one (checkpoint_seq, forward_intermediates), bypassing its forward"
    return None


def trace_hooks() -> TraceHooks:
    try:
        from timm.layers import _fx
    except ImportError:  # pragma: no cover - very old timm
        return TraceHooks(root_refusals=(refuse_sequential_root,))
    functions = tuple(f for f in _fx.get_notrace_functions() if callable(f))
    return TraceHooks(leaf_functions=functions, root_refusals=(refuse_sequential_root,))
