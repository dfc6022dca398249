"""timm: the helpers timm declares untraceable stay opaque; probe inputs at the model's resolution.

timm registers the functions that branch on shapes or values (``resample_abs_pos_embed``,
``window_partition`` helpers, ...) with ``register_notrace_function`` for its own fx feature
extractor; fxlora keeps them as single ``call_function`` nodes too, evaluated on the real values
when the graph runs. (timm's "notrace" *modules* need nothing: fxlora already leaves every module
without an adapted layer inside as one node, and one that contains adapted layers is traced
through or, if it cannot be, planned below.)

A timm model has entry points besides ``forward`` that call its layers directly
(``forward_features``, ``forward_head``, ``forward_intermediates``, ``checkpoint_seq``): they
compute with LoRA too, because every adapted layer keeps its eager forward (`fxlora.runtime.forwards`); only
a call from graph code asks a layer for its base output.

Imported only for models built from timm classes (`fxlora.tracing.integrations.hooks_for`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from fxlora.tracing.integrations import TraceHooks

__all__ = ["trace_hooks", "example_inputs", "pure_norm"]


def example_inputs(model: nn.Module) -> list[tuple[tuple, dict[str, Any]]]:
    """One image at the model's own resolution (its ``img_size``, its patch embedding's, or its
    pretrained config's input size; 224 otherwise), for `fxlora.tracing.probe` to observe how the blocks
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


def pure_norm(module: nn.Module) -> bool:
    """A norm layer of ``timm.layers.norm`` (``LayerNorm``, ``LayerNorm2d``, ``RmsNorm``,
    ``GroupNorm``, ...) on torch's own kernels: ``F.layer_norm`` / ``F.group_norm`` / timm's
    ``rms_norm`` over its input and its own weights, nothing else. Not with timm's opt-in fast norm
    (``set_fast_norm``), which may call APEX kernels."""
    return type(module).__module__ == "timm.layers.norm" and not getattr(module, "_fast_norm", True)


def trace_hooks() -> TraceHooks:
    try:
        from timm.layers import _fx
    except ImportError:  # pragma: no cover - very old timm
        return TraceHooks(example_inputs=example_inputs, pure_in_eval=(pure_norm,))
    functions = tuple(f for f in _fx.get_notrace_functions() if callable(f))
    return TraceHooks(leaf_functions=functions, example_inputs=example_inputs, pure_in_eval=(pure_norm,))
