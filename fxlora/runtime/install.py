"""Putting a `Plan`'s adapter modules and fxlora's forwards on a model, and taking fxlora off
again. The all-or-nothing bookkeeping around these steps is the adapter state's transaction
(`fxlora.model.state.AdapterState.transaction`); `strip` takes every trace of fxlora off."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch.nn as nn

from fxlora.errors import UnsupportedTargetError

from fxlora.runtime.forwards import EagerLoraForward, GraphForward, SavedForward, graph_forwards, install, installed_forward, uninstall
from fxlora.runtime.idle import skippable_fixed
from fxlora.core.layers import attach_adapter, attach_saved_copy, detach_all, saved_meta, target_meta
from fxlora.kinds.weight_inits import init_of
from fxlora.core.weight_use import acts_through_weight
from fxlora.planning.plan import PathInfo, Plan, RootPlan, assign_paths
from fxlora.tracing.integrations import hooks_fixed
from fxlora.tracing.submodules import trees_fixed
from fxlora.tracing.reuse import TraceCache
from fxlora.tracing.traced import CONSTANT_PREFIX

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.state import AdapterState

__all__ = [
    "attach_plan",
    "install_forwards",
    "refresh_all",
    "prepare_all",
    "uninstall_forwards",
    "reinstall_forwards",
    "installed_forwards",
    "restore_forwards",
    "adapted_modules",
    "strip",
    "restore_requires_grad",
    "fxlora_present",
]


def fxlora_present(model: nn.Module) -> bool:
    return any(
        target_meta(m) is not None or saved_meta(m) is not None or installed_forward(m) is not None
        for m in model.modules()
    )


def attach_plan(plan: Plan) -> None:
    """Create the plan's adapter on its targets and its `modules_to_save` copies (no forwards).
    Inside a parent with a fused fast path (`fxlora.planning.target_checks.fused_parent`), the
    adapter's own modules get a no-op forward pre-hook, which turns that fast path off."""
    for t in plan.targets:
        attach_adapter(t.module, plan.adapter, t.spec, init_of(plan.config), t.kind, t.fan_in_fan_out)
    for s in plan.saved:
        attach_saved_copy(s.module, plan.adapter)
    for p in [*plan.targets, *plan.saved]:
        if p.name in plan.unfused:
            holder = next((h for h in p.module.children() if isinstance(h, nn.ModuleDict) and plan.adapter in h), None)
            if holder is not None:  # every kind that fits in such a parent has adapter modules
                holder[plan.adapter].register_forward_pre_hook(keep_unfused)  # one in the parent suffices


def keep_unfused(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence makes ``nn.TransformerEncoderLayer``
    compute through its modules instead of its fused kernel on their weights."""
    return None


def _check_own_call(name: str, module: nn.Module, previous: Optional[Callable]) -> None:
    """`UnsupportedTargetError` for a layer whose kind computes its adapted call from its class's
    forward (`fxlora.kinds.LayerKind.own_call`) but whose instance forward was replaced (accelerate's
    dispatch, a wrapper): that forward would be bypassed."""
    meta = target_meta(module)
    if previous is not None and meta is not None and meta.kind.own_call:
        raise UnsupportedTargetError(
            f"cannot adapt {name!r} ({type(module).__name__}): its forward was replaced on the instance "
            f"({type(previous).__name__}, e.g. by accelerate's dispatch or offloading), and its adapters run the "
            "class's own forward on updated weights, which would bypass it; adapt the model before dispatching "
            "it, or exclude the layer (exclude_modules)"
        )


def install_forwards(model: nn.Module, roots: list[RootPlan], paths: dict[str, PathInfo], owner: "AdapterState") -> None:
    """Install an eager forward on every adapted and saved module (so that any call of it computes
    with LoRA), then a `GraphForward` on each root (whose code calls those modules for their base
    output and adds the branches as graph nodes)."""
    for name in paths:
        module = model.get_submodule(name)
        previous = module.__dict__.get("forward")
        _check_own_call(name, module, previous)
        cls = EagerLoraForward if target_meta(module) is not None else SavedForward
        install(module, cls(module, owner, previous=previous))
    forwards = [(r.module, GraphForward(r.module, owner, r.variants, r.pending)) for r in roots]
    for module, forward in forwards:  # all installed first: a root's code asks about the roots it calls
        install(module, forward)
    refresh_all([forward for _, forward in forwards])


def refresh_all(forwards: Iterable[GraphForward], build: bool = False) -> None:
    """`GraphForward.refresh` each of `forwards` (after adapters or pass options changed); with
    `build`, their gated code is built now instead of when torch.compile next compiles
    (`fxlora.runtime.compile_builds`). Each module tree is walked once (`trees_fixed`) and each
    graph's `skippable` asked once: nothing of the trees changes while their code is built."""
    forwards = list(forwards)
    with trees_fixed(), skippable_fixed():
        for forward in forwards:
            forward.refresh()
        for forward in forwards if build else ():
            forward.build_gated()


def prepare_all(model: nn.Module) -> None:
    """`GraphForward.prepare` every graph root of `model` for the mode it is in (after a mode
    switch): each root's `mode_keys` traced first, all through one `TraceCache`, so that
    identical blocks are traced once per pattern (as when planning); their gated code is built
    when torch.compile next compiles, identical blocks sharing one build
    (`fxlora.runtime.compile_builds`). A mode switch adds, removes and replaces no module: each tree is walked
    once (`trees_fixed`, `hooks_fixed`). (`skippable` is asked afresh: a guard that fails while
    building retraces a root, whose parent's answer then changes.)"""
    cache = TraceCache(model)
    with trees_fixed(), hooks_fixed():
        for forward in graph_forwards(model):
            forward.prepare(forward.root.training, cache)


def uninstall_forwards(model: nn.Module) -> None:
    for module in model.modules():
        uninstall(module)


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules carrying an adapter or a `modules_to_save` copy, by name, in named_modules order."""
    return {n: m for n, m in model.named_modules() if target_meta(m) is not None or saved_meta(m) is not None}


def installed_forwards(model: nn.Module) -> dict[nn.Module, Any]:
    """fxlora's forwards on `model` now, to put back with `restore_forwards`."""
    return {m: m.__dict__["forward"] for m in model.modules() if installed_forward(m) is not None}


def restore_forwards(model: nn.Module, forwards: dict[nn.Module, Any]) -> None:
    """Make `forwards` (from `installed_forwards`) fxlora's forwards on `model` again."""
    uninstall_forwards(model)
    for module, forward in forwards.items():
        install(module, forward)


def reinstall_forwards(model: nn.Module, owner: "AdapterState") -> dict[str, PathInfo]:
    """Re-plan the paths of every adapted module (after adapters were added or removed) and
    install the forwards again. On failure the previous forwards are restored."""
    previous = installed_forwards(model)
    uninstall_forwards(model)
    try:
        adapted = adapted_modules(model)
        by_weight = frozenset(name for name, module in adapted.items() if acts_through_weight(module))
        roots, paths = assign_paths(model, adapted, owner.trace_policy, by_weight)
        install_forwards(model, roots, paths, owner)
    except BaseException:
        restore_forwards(model, previous)
        raise
    return paths


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
