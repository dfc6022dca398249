"""timm: the helpers timm declares untraceable stay opaque; the model and its block lists are not roots.

timm registers the functions that branch on shapes or values (``resample_abs_pos_embed``,
``window_partition`` helpers, ...) with ``register_notrace_function`` for its own fx feature
extractor; fxlora keeps them as single ``call_function`` nodes too, evaluated on the real values
when the graph runs. (timm's "notrace" *modules* need nothing: fxlora already leaves every module
without an adapted layer inside as one node, and one that contains adapted layers is traced
through or, if it cannot be, planned below.)

A graph root only computes with LoRA when it is entered through its ``forward``. A timm model has
other entry points that call its layers directly (``forward_features``, ``forward_head``,
``forward_intermediates``, feature extractors), and timm calls the blocks of its ``nn.Sequential``
block lists one by one (``checkpoint_seq``, ``forward_intermediates``). So neither the model
itself nor a block list becomes a graph root (`refuse_root`): the roots are the blocks, stages,
stems and heads inside, which every entry point calls as modules, and a target sitting directly on
the model (a classifier ``head``, a stem conv) takes the eager path, which works from every entry
point too.

Imported only for models built from timm classes (`fxlora.integrations.hooks_for`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from ..integrations import TraceHooks

__all__ = ["trace_hooks", "refuse_root", "example_inputs"]


def refuse_root(module: nn.Module, is_model: bool) -> Optional[str]:
    """Why `module` must not be a graph root of a timm model (None: it may be)."""
    if is_model and type(module).__module__.startswith("timm.") and hasattr(module, "forward_features"):
        return (
            "a timm model's other entry points (forward_features, forward_head, forward_intermediates) call its "
            "layers directly, bypassing a graph of the whole model"
        )
    if _is_block_list(module):
        return "timm may call this list of blocks one by one (checkpoint_seq, forward_intermediates), bypassing its forward"
    return None


def _is_block_list(module: nn.Module) -> bool:
    """An ``nn.Sequential`` of blocks of one (non-torch) class, or of such lists (stages): what
    timm iterates. Stems and heads, sequences of torch layers, are called as a whole."""
    if type(module) is not nn.Sequential or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    kind = next(iter(kinds))
    return kind is nn.Sequential or not kind.__module__.startswith("torch.")


def example_inputs(model: nn.Module) -> list[tuple[tuple, dict[str, Any]]]:
    """One image at the model's own resolution (its ``img_size``, its patch embedding's, or its
    pretrained config's input size; 224 otherwise), for `fxlora.probe` to observe how the blocks
    are called (keyword arguments such as ``rope=`` included). Only for timm's model classes."""
    if not type(model).__module__.startswith("timm.") or not hasattr(model, "forward_features"):
        return []
    size = getattr(model, "img_size", None) or getattr(getattr(model, "patch_embed", None), "img_size", None)
    config = getattr(model, "pretrained_cfg", None) or {}
    if size is None:
        size = tuple(config.get("input_size", (3, 224, 224)))[1:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(model, "in_chans", None) or tuple(config.get("input_size", (3,)))[0]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return [((torch.zeros(1, channels, *size, device=device),), {})]


def trace_hooks() -> TraceHooks:
    try:
        from timm.layers import _fx
    except ImportError:  # pragma: no cover - very old timm
        return TraceHooks(root_refusals=(refuse_root,), example_inputs=example_inputs)
    functions = tuple(f for f in _fx.get_notrace_functions() if callable(f))
    return TraceHooks(leaf_functions=functions, root_refusals=(refuse_root,), example_inputs=example_inputs)
