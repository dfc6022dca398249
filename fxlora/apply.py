"""Applying a `Plan` to a model, and taking fxlora off a model again.

`apply_plan` is all-or-nothing: if anything fails half-way, `strip` runs and the model is as it
was before (modules, forwards, ``requires_grad`` flags).
"""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

from .forwards import EagerLoraForward, GraphForward, SavedForward, install, installed_forward, uninstall
from .layers import AdapterGates, attach_adapter, attach_saved_copy, detach_all, saved_meta, target_meta
from .planning import Plan

__all__ = ["apply_plan", "strip", "lora_parameters", "fxlora_present", "set_trainable"]


def fxlora_present(model: nn.Module) -> bool:
    return any(
        target_meta(m) is not None or saved_meta(m) is not None or installed_forward(m) is not None
        for m in model.modules()
    )


def apply_plan(model: nn.Module, plan: Plan, gates: AdapterGates) -> None:
    """Attach the plan's adapter and copies, install the forwards, set what trains.

    Guarantees on failure: `model` is left exactly as before (the exception propagates).
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        gates.add(plan.adapter)
        for t in plan.targets:
            attach_adapter(t.module, plan.adapter, t.spec, plan.config.init_lora_weights, gates, t.fan_in_fan_out)
        for s in plan.saved:
            attach_saved_copy(s.module, plan.adapter, gates)
        for r in plan.roots:
            forward = GraphForward(r.module, r.variants)
            forward.refresh()
            install(r.module, forward)
        for p in [*plan.targets, *plan.saved]:
            if p.path == "eager":
                cls = EagerLoraForward if target_meta(p.module) is not None else SavedForward
                install(p.module, cls(p.module, previous=p.module.__dict__.get("forward")))
        set_trainable(model, plan.adapter, plan.config.bias)
    except BaseException:
        strip(model)
        for p in model.parameters():
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        raise


def strip(model: nn.Module) -> None:
    """Remove every fxlora forward, adapter module, copy and record from `model`."""
    for module in list(model.modules()):
        uninstall(module)
        detach_all(module)


def lora_parameters(model: nn.Module, adapter: str) -> Iterator[nn.Parameter]:
    """The LoRA weights (A, B, their biases) and `modules_to_save` copies of one adapter."""
    for module in model.modules():
        if target_meta(module) is not None:
            for holder in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                child = module._modules.get(holder)
                if child is not None and adapter in child:
                    entry = child[adapter]
                    yield from ([entry] if isinstance(entry, nn.Parameter) else entry.parameters())
        meta = saved_meta(module)
        if meta is not None and adapter in meta.adapters:
            yield from module.modules_to_save[adapter].parameters()


def _base_biases(model: nn.Module, bias: str) -> Iterator[nn.Parameter]:
    if bias == "none":
        return
    saved_originals = {id(p) for m in model.modules() if saved_meta(m) is not None for p in _own_params(m)}
    if bias == "all":
        internal = {id(p) for m in model.modules() for p in _fxlora_params(m)}
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and id(p) not in saved_originals and id(p) not in internal:
                yield p
    else:  # lora_only
        for m in model.modules():
            if target_meta(m) is not None and getattr(m, "bias", None) is not None:
                yield m.bias


def _fxlora_params(module: nn.Module) -> Iterator[nn.Parameter]:
    from .layers import LORA_CHILDREN

    for name in LORA_CHILDREN:
        child = module._modules.get(name)
        if child is not None:
            yield from child.parameters()


def _own_params(module: nn.Module) -> Iterator[nn.Parameter]:
    internal = {id(p) for p in _fxlora_params(module)}
    return (p for p in module.parameters() if id(p) not in internal)


def set_trainable(model: nn.Module, adapter: str, bias: str) -> None:
    """Freeze everything, then let `adapter`'s weights, its copies and the `bias` biases train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model, adapter):
        p.requires_grad_(True)
    for p in _base_biases(model, bias):
        p.requires_grad_(True)
