"""Module boundaries: what PyTorch hangs on a module's ``__call__``, which a graph that inlines
the module's forward would skip.

A module *has a boundary* (`boundary_of`) when calling it does more than run its class's
``forward``: hooks registered on it (forward, pre, backward: FSDP2's unshard and reshard, an
activation capture, a profiler's), ``module.compile()``, a ``forward`` replaced on the instance
(accelerate's dispatch, a nested graph root), an activation-checkpoint wrapper, a layer that
checkpoints its own call (transformers' ``gradient_checkpointing_enable()``). fxlora keeps every
boundary:

- a module with a boundary when a root is traced is never traced through
  (`fxlora.tracing.traced.trace_through_ids`): the root's graph calls it as a module, so its
  ``__call__`` runs whole; where it holds adapted layers it becomes a graph root of its own
  (`nested_roots`);
- a graph holds only while the modules it inlined have no boundary and keep their children
  (`Inlined.hold`); when one gains a boundary the root is traced again;
- hooks on a layer the graph calls for its base output only, or global module hooks
  (``register_module_forward_hook``), make that call run the root's own forward, where every
  module is called through its ``__call__`` (`LeafHooks`).
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.modules.module as _module_impl

__all__ = ["boundary_of", "Inlined", "NOTHING_INLINED", "inlined", "LeafHooks", "leaf_hooks", "nested_roots"]

#: the per-module hook tables ``nn.Module.__call__`` runs
HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

#: the process-wide hook tables every module call runs (``torch.nn.modules.module.register_module_*``)
GLOBAL_HOOK_TABLES = tuple(
    getattr(_module_impl, f"_global{name}") for name in HOOK_TABLES
)


def _activation_wrapper() -> Optional[type]:
    try:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return ActivationWrapper


_ACTIVATION_WRAPPER = _activation_wrapper()


def boundary_of(module: nn.Module) -> Optional[str]:
    """Why calling `module` does more than its class's ``forward`` (None: it does not)."""
    hooks = [name.strip("_").replace("_", " ") for name in HOOK_TABLES if getattr(module, name)]
    if hooks:
        return "it has " + ", ".join(hooks)
    if module._compiled_call_impl is not None:
        return "it is compiled on its own (module.compile())"
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance"
    if _ACTIVATION_WRAPPER is not None and isinstance(module, _ACTIVATION_WRAPPER):
        return "it is an activation-checkpoint wrapper"
    if getattr(module, "gradient_checkpointing", False) is True and type(module).__call__ is not nn.Module.__call__:
        return "it checkpoints its own call (gradient checkpointing)"
    return None


class Inlined(NamedTuple):
    """The modules a graph traced through, as they were: their hook tables (empty), their
    children, their classes. `hold` is true while calling each would still only run its
    forward with those children."""

    modules: tuple[nn.Module, ...]
    classes: tuple[type, ...]
    hook_tables: tuple[dict, ...]
    children: tuple[dict, ...]
    snapshot: tuple[dict, ...]

    def hold(self) -> bool:
        if any(self.hook_tables):
            return False
        if torch.compiler.is_compiling():  # dynamo guards the module tree it reads itself
            return True
        if self.children != self.snapshot:
            return False
        for module, cls in zip(self.modules, self.classes):
            if type(module) is not cls or module._compiled_call_impl is not None or "forward" in module.__dict__:
                return False
        return True

    def changed(self) -> Optional[str]:
        """Which inlined module changed and how (None while `hold`)."""
        for module, cls, live, old in zip(self.modules, self.classes, self.children, self.snapshot):
            reason = boundary_of(module)
            if reason is None and type(module) is not cls:
                reason = f"its class became {type(module).__name__}"
            if reason is None and live != old:
                reason = "its children were replaced"
            if reason is not None:
                return f"{type(module).__name__}: {reason}"
        return None


#: the record of a graph that inlined nothing
NOTHING_INLINED = Inlined((), (), (), (), ())


def inlined(root: nn.Module, traced: Iterable[nn.Module]) -> Inlined:
    """The `Inlined` record of the modules a graph of `root` traced through (`root` itself runs
    its own ``__call__``: only its children are recorded)."""
    modules = tuple(traced)
    inner = tuple(m for m in modules if m is not root)
    return Inlined(
        modules=inner,
        classes=tuple(type(m) for m in inner),
        hook_tables=tuple(getattr(m, name) for m in inner for name in HOOK_TABLES),
        children=tuple(m._modules for m in modules),
        snapshot=tuple(dict(m._modules) for m in modules),
    )


class LeafHooks(NamedTuple):
    """The hook tables of the layers a graph calls for their base output only (whose branch it
    adds itself), and the global ones: while any is non-empty the call runs the root's own
    forward, so that every hook sees what the module really returns."""

    tables: tuple[dict, ...]

    def present(self) -> bool:
        return any(self.tables)


def leaf_hooks(layers: Iterable[nn.Module]) -> LeafHooks:
    return LeafHooks(GLOBAL_HOOK_TABLES + tuple(getattr(m, name) for m in layers for name in HOOK_TABLES))


def nested_roots(root: nn.Module, interesting: Iterable[nn.Module], is_root: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The modules below `root` that must run as graph roots of their own: for each outermost
    module with a boundary that holds interesting modules, that module, or (when its own forward
    cannot be a graph: a wrapper, a replaced forward) the outermost modules inside it that can.
    Modules `is_root` accepts (roots already) are neither returned nor looked into."""
    wanted = {id(m) for m in interesting}
    found: list[nn.Module] = []

    def holds_wanted(module: nn.Module) -> bool:
        return any(id(m) in wanted for m in module.modules() if m is not module)

    def visit(module: nn.Module, inside_boundary: bool) -> None:
        for child in module.children():
            if id(child) in wanted or is_root(child) or not holds_wanted(child):
                continue
            if boundary_of(child) is None and not inside_boundary:
                visit(child, False)  # traced through
            elif _can_be_root(child):
                found.append(child)
            else:
                visit(child, True)

    visit(root, False)
    return found


def _can_be_root(module: nn.Module) -> bool:
    """A graph of `module`'s class forward would run inside its ``__call__`` exactly as the
    forward does now (no wrapper replaced it, it is no checkpoint wrapper)."""
    if "forward" in module.__dict__:
        return False
    return not (_ACTIVATION_WRAPPER is not None and isinstance(module, _ACTIVATION_WRAPPER))
