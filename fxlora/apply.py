"""Applying a `Plan` to a model, and taking fxlora off a model again.

`apply_plan` is all-or-nothing: if anything fails half-way, `strip` runs and the model is as it
was before (modules, forwards, ``requires_grad`` flags).
"""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

from .forwards import EagerLoraForward, GraphForward, SavedForward, install, installed_forward, uninstall
from .layers import AdapterGates, attach_adapter, attach_saved_copy, detach_all, saved_meta, target_meta
from .planning import PathInfo, Plan, RootPlan, TracePolicy, assign_paths
from .tracing import CONSTANT_PREFIX

__all__ = [
    "apply_plan",
    "attach_plan",
    "install_forwards",
    "uninstall_forwards",
    "reinstall_forwards",
    "adapted_modules",
    "strip",
    "restore_requires_grad",
    "lora_parameters",
    "fxlora_present",
    "set_trainable",
]


def fxlora_present(model: nn.Module) -> bool:
    return any(
        target_meta(m) is not None or saved_meta(m) is not None or installed_forward(m) is not None
        for m in model.modules()
    )


def attach_plan(model: nn.Module, plan: Plan, gates: AdapterGates) -> None:
    """Create the plan's adapter on its targets and its `modules_to_save` copies (no forwards)."""
    gates.add(plan.adapter)
    for t in plan.targets:
        attach_adapter(t.module, plan.adapter, t.spec, plan.config.init_lora_weights, gates, t.fan_in_fan_out)
    for s in plan.saved:
        attach_saved_copy(s.module, plan.adapter, gates)


def install_forwards(model: nn.Module, roots: list[RootPlan], paths: dict[str, PathInfo]) -> None:
    """Install an eager forward on every adapted and saved module (so that any call of it computes
    with LoRA), then a `GraphForward` on each root (whose code calls those modules for their base
    output and adds the branches as graph nodes)."""
    for name in paths:
        module = model.get_submodule(name)
        cls = EagerLoraForward if target_meta(module) is not None else SavedForward
        install(module, cls(module, previous=module.__dict__.get("forward")))
    for r in roots:
        forward = GraphForward(r.module, r.variants)
        forward.refresh()
        install(r.module, forward)


def uninstall_forwards(model: nn.Module) -> None:
    for module in model.modules():
        uninstall(module)


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules carrying an adapter or a `modules_to_save` copy, by name, in named_modules order."""
    return {n: m for n, m in model.named_modules() if target_meta(m) is not None or saved_meta(m) is not None}


def reinstall_forwards(model: nn.Module, policy: TracePolicy) -> dict[str, PathInfo]:
    """Re-plan the paths of every adapted module (after adapters were added or removed) and
    install the forwards again. On failure the previous forwards are restored."""
    previous = {m: m.__dict__["forward"] for m in model.modules() if installed_forward(m) is not None}
    uninstall_forwards(model)
    try:
        roots, paths = assign_paths(model, adapted_modules(model), policy)
        install_forwards(model, roots, paths)
    except BaseException:
        uninstall_forwards(model)
        for module, forward in previous.items():
            install(module, forward)
        raise
    return paths


def apply_plan(model: nn.Module, plan: Plan, gates: AdapterGates) -> None:
    """Attach the plan's adapter and copies, install the forwards, set what trains.

    Guarantees on failure: `model` is left exactly as before (the exception propagates).
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        attach_plan(model, plan, gates)
        paths = {p.name: PathInfo(p.path, p.root, p.reason) for p in [*plan.targets, *plan.saved]}
        install_forwards(model, plan.roots, paths)
        set_trainable(model, {plan.adapter: plan.config.bias})
    except BaseException:
        strip(model)
        restore_requires_grad(model, flags)
        raise


def restore_requires_grad(model: nn.Module, flags: dict[int, bool]) -> None:
    for p in model.parameters():
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])


def strip(model: nn.Module) -> None:
    """Remove every fxlora forward, adapter module, copy, record and trace-time constant."""
    for module in list(model.modules()):
        uninstall(module)
        detach_all(module)
        for name in [b for b in module._buffers if b.startswith(CONSTANT_PREFIX)]:
            del module._buffers[name]


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


def set_trainable(model: nn.Module, adapters: dict[str, str]) -> None:
    """Freeze everything, then let the given adapters' weights and copies train, and the base
    biases their ``bias`` settings ("none", "all", "lora_only") ask for."""
    for p in model.parameters():
        p.requires_grad_(False)
    for adapter, bias in adapters.items():
        for p in lora_parameters(model, adapter):
            p.requires_grad_(True)
        for p in _base_biases(model, bias):
            p.requires_grad_(True)
