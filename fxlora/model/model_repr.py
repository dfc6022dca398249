"""The repr of an adapted model: `nn.Module.__repr__` with fxlora's children (``lora_A``,
``lora_B``, ``modules_to_save`` copies...) folded into a note on their module's line, which says
the adapter's rank and alpha and whether the layer runs in a graph or eagerly."""

from __future__ import annotations

import torch.nn as nn

from fxlora.core.layers import LORA_CHILDREN, saved_meta, target_meta

__all__ = ["annotated_repr"]


def _lora_note(module: nn.Module, path: str) -> str:
    meta = target_meta(module)
    if meta is not None:
        parts = [f"{a}: r={s.r} alpha={s.alpha:g}" for a, s in meta.adapters.items()]
        return f"  [LoRA {', '.join(parts)}; {path}]"
    saved = saved_meta(module)
    if saved is not None:
        return f"  [modules_to_save: trainable copy for {', '.join(saved.adapters)}]"
    return ""


def annotated_repr(module: nn.Module, paths: dict[str, str], name: str = "") -> str:
    """`nn.Module.__repr__` with fxlora's children folded into a note on their module's line."""
    hide = _is_fxlora_child(module)
    children = [(k, m) for k, m in module._modules.items() if m is not None and not (hide and k in LORA_CHILDREN)]
    note = _lora_note(module, paths.get(name, "eager"))
    extra_lines = module.extra_repr().split("\n") if module.extra_repr() else []
    child_lines = [
        f"({key}): " + annotated_repr(child, paths, f"{name}.{key}" if name else key).replace("\n", "\n  ")
        for key, child in children
    ]
    if not child_lines and len(extra_lines) <= 1:
        return f"{module._get_name()}({''.join(extra_lines)}){note}"
    body = "\n  ".join(extra_lines + child_lines)
    return f"{module._get_name()}({note}\n  {body}\n)"


def _is_fxlora_child(module: nn.Module) -> bool:
    return target_meta(module) is not None or saved_meta(module) is not None
