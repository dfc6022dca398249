"""Module boundaries in graphs: what PyTorch hangs on a module's ``__call__``
(`fxlora.boundary.boundary_of`), which a graph that inlines the module's forward would skip.

fxlora keeps every boundary:

- a module with a boundary when a root is traced is never traced through
  (`fxlora.tracing.traced.trace_through_ids`): the root's graph calls it as a module, so its
  ``__call__`` runs whole; where it holds adapted layers it becomes a graph root of its own
  (`nested_roots`);
- a graph holds only while the modules it inlined have no boundary and keep their children
  (`Inlined.hold`); when one gains a boundary the root is traced again;
- hooks on a layer the graph calls for its base output only, a wrapper replacing its forward,
  or global module hooks (``register_module_forward_hook``), make that call run the root's own
  forward, where every module is called through its ``__call__`` (`BaseLayers`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.modules.module as _module_impl

from fxlora.boundary import GLOBAL_HOOK_TABLES, HOOK_TABLES, boundary_of, can_be_root
from fxlora.tracing.integrations import TraceHooks, hooks_for
from fxlora.tracing.submodules import named_submodules

__all__ = [
    "kept_children",
    "traced_into", "HookTables", "hook_tables", "Inlined", "NOTHING_INLINED", "inlined", "BaseLayers", "base_layers", "subtree_hooks",
    "nested_roots"]

class HookTables(NamedTuple):
    """The hook tables of some modules below a graph root (`paths`, relative to it), and the global
    ones where `with_global`. `absent` is true while all are empty.

    Only modules that can be called have their tables here: a container with no forward
    (``nn.ModuleDict``, ``nn.ModuleList``, ``nn.ParameterDict``) is indexed, never called, so its
    hooks never run, in fxlora as in the model without it.

    Run as is, `absent` tests the tuple of tables. Under torch.compile it runs `compiled_check`, a
    function generated for the paths, which reaches each module from the root as the generated
    code does and tests each table's length, with the paths written in its code: dynamo guards
    every length (a hook added after compiling recompiles, and runs) and nothing else of the
    record, so identical blocks, whose records differ only in their modules, share compiled code.
    (A truth test of a table taken from a tuple gets no length guard from dynamo, so hooks added
    later would go unseen; paths read from a tuple would be guarded one string at a time.)"""

    paths: tuple[str, ...]
    tables: tuple[dict, ...]
    with_global: bool
    compiled_check: Callable[[nn.Module], bool]

    def absent(self, root: nn.Module) -> bool:
        """`root`: the graph's root the paths start from."""
        if torch.compiler.is_compiling():
            return self.compiled_check(root)
        return not any(self.tables)

    def __reduce__(self) -> tuple:
        return (_with_check, (self.paths, self.tables, self.with_global))  # the check is generated code


def _with_check(paths: tuple[str, ...], tables: tuple[dict, ...], with_global: bool) -> HookTables:
    return HookTables(paths, tables, with_global, _length_check(paths, with_global))


def hook_tables(root: nn.Module, modules: Iterable[nn.Module], with_global: bool) -> HookTables:
    """The `HookTables` of `modules` (below `root`), each a child of `root` or of another of
    them (the modules a graph traced through: only their part of the tree is walked)."""
    modules = tuple(modules)
    names = _paths_within(root, {id(m) for m in modules}) if modules else {}
    if len(names) < len(modules):  # some module sits below one that is not among them
        names = {id(m): name for name, m in named_submodules(root)}
    return _tables_at([(names[id(m)], m) for m in modules], with_global)


def _paths_within(root: nn.Module, wanted: set[int]) -> dict[int, str]:
    """A path below `root` of each module of `wanted` that is reached from `root` through
    modules of `wanted` alone."""
    paths: dict[int, str] = {}
    stack = [("", root)]
    while stack:
        prefix, module = stack.pop()
        for name, child in reversed(module._modules.items()):
            if child is not None and id(child) in wanted and id(child) not in paths:
                paths[id(child)] = path = prefix + name
                stack.append((path + ".", child))
    return paths


def _callable(module: nn.Module) -> bool:
    """Whether calling `module` can run its hooks (a container with no forward is never called)."""
    return getattr(type(module), "forward", None) is not _module_impl._forward_unimplemented


def _tables_at(named: list[tuple[str, nn.Module]], with_global: bool) -> HookTables:
    named = [(path, m) for path, m in named if _callable(m)]
    own = tuple(getattr(m, name) for _, m in named for name in HOOK_TABLES)
    paths = tuple(path for path, _ in named)
    return _with_check(paths, GLOBAL_HOOK_TABLES + own if with_global else own, with_global)


@functools.lru_cache(maxsize=1024)
def _length_check(paths: tuple[str, ...], with_global: bool) -> Callable[[nn.Module], bool]:
    """``absent(root)``: whether every hook table of the modules at `paths` below `root` (and the
    global ones, where `with_global`) is empty, tested by length, the paths written in the code.
    One function per set of paths: the identical blocks of a model share it."""
    modules = ["root" + "".join(f"._modules[{part!r}]" for part in path.split(".")) if path else "root" for path in paths]
    tables = [f"{module}.{name}" for module in modules for name in HOOK_TABLES]
    if with_global:
        tables += [f"_module_impl._global{name}" for name in HOOK_TABLES]
    source = "def absent(root):\n    return not (" + " or ".join([f"len({t})" for t in tables] or ["False"]) + ")\n"
    namespace: dict[str, Any] = {"_module_impl": _module_impl}
    exec(compile(source, f"<fxlora hook check {len(paths)} modules>", "exec"), namespace)
    return namespace["absent"]


class Inlined(NamedTuple):
    """The modules a graph traced through, as they were: their hook tables (empty; global hooks
    are `BaseLayers`' concern), their children, their classes. `hold` is true while calling each
    would still only run its forward with those children."""

    modules: tuple[nn.Module, ...]
    classes: tuple[type, ...]
    hooks: HookTables
    children: tuple[dict, ...]
    snapshot: tuple[dict, ...]

    def hold(self, root: nn.Module) -> bool:
        """`root`: the graph's root (the record's modules are reached from it under torch.compile)."""
        if not self.hooks.absent(root):
            return False
        if torch.compiler.is_compiling():  # dynamo guards the module tree it reads itself
            return True
        if self.children != self.snapshot:
            return False
        for module, cls in zip(self.modules, self.classes):
            if type(module) is not cls or module._compiled_call_impl is not None or "forward" in module.__dict__:
                return False
        return True


#: the record of a graph that inlined nothing
NOTHING_INLINED = Inlined((), (), _tables_at([], False), (), ())


def inlined(root: nn.Module, traced: Iterable[nn.Module]) -> Inlined:
    """The `Inlined` record of the modules a graph of `root` traced through (`root` itself runs
    its own ``__call__``: only its children are recorded)."""
    modules = tuple(traced)
    inner = tuple(m for m in modules if m is not root)
    return Inlined(
        modules=inner,
        classes=tuple(type(m) for m in inner),
        hooks=hook_tables(root, inner, with_global=False),
        children=tuple(m._modules for m in modules),
        snapshot=tuple(dict(m._modules) for m in modules),
    )


class BaseLayers(NamedTuple):
    """The layers a graph calls for their base output only (bypassing their ``__call__``: it
    adds their branches itself), with the forward each had installed, their hook tables (and
    their adapter modules') and the global ones. `bypassable` is false while any hook table is
    non-empty or a layer's forward was replaced since (accelerate's ``cpu_offload`` after
    ``transform``): the call then runs the root's own forward, so that every hook and wrapper
    sees what the module really does."""

    layers: tuple[nn.Module, ...]
    forwards: tuple
    hooks: HookTables

    def bypassable(self, root: nn.Module) -> bool:
        """`root`: the graph's root (the layers are reached from it under torch.compile)."""
        if not self.hooks.absent(root):
            return False
        return all(m.__dict__.get("forward") is f for m, f in zip(self.layers, self.forwards))


def base_layers(paths: Iterable[str], layers: Iterable[nn.Module], forwards: Iterable[Any]) -> BaseLayers:
    """The `BaseLayers` record of `layers` at `paths` below a graph root, each expected to keep
    the forward in `forwards` (fxlora's own: a layer whose forward is someone else's is never
    bypassed)."""
    layers = tuple(layers)
    named = [pair for path, layer in zip(paths, layers) for pair in layer.named_modules(prefix=path)]
    return BaseLayers(layers, tuple(forwards), _tables_at(named, with_global=True))


def subtree_hooks(root: nn.Module) -> HookTables:
    """The `HookTables` of every module below `root` (its own hooks run outside its forward), and
    the global ones. Code that runs the root's modules inside ``torch.cond``
    (`fxlora.runtime.idle.run_gated`) needs them empty: a hook with a side effect (appending to a
    list, logging) cannot run inside a ``torch.cond`` branch."""
    return _tables_at([(name, m) for name, m in named_submodules(root) if name], with_global=True)


def traced_into(module: nn.Module, hooks: TraceHooks) -> bool:
    """A graph may trace through `module`: no module boundary, not kept whole by an integration
    (`TraceHooks.kept_whole`)."""
    return boundary_of(module) is None and not hooks.keeps_whole(module)


def nested_roots(root: nn.Module, interesting: Iterable[nn.Module], is_root: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The modules below `root` that must run as graph roots of their own: for each outermost
    module with a boundary (or kept whole by an integration, `TraceHooks.kept_whole`) that holds
    interesting modules, that module, or (when its own forward
    cannot be a graph: a wrapper, a replaced forward) the outermost modules inside it that can.
    Modules `is_root` accepts (roots already) are neither returned nor looked into."""
    wanted = {id(m) for m in interesting}
    found: list[nn.Module] = []
    hooks = hooks_for(root)

    def holds_wanted(module: nn.Module) -> bool:
        return any(id(m) in wanted for m in module.modules() if m is not module)

    def visit(module: nn.Module, inside_boundary: bool) -> None:
        for child in module.children():
            if id(child) in wanted or is_root(child) or not holds_wanted(child):
                continue
            if traced_into(child, hooks) and not inside_boundary:
                visit(child, False)  # traced through
            elif can_be_root(child):
                found.append(child)
            else:
                visit(child, True)

    visit(root, False)
    return found


def kept_children(root: nn.Module, interesting: Iterable[nn.Module]) -> dict[str, str]:
    """For a root an integration keeps whole (`TraceHooks.kept_whole`): its children that hold
    interesting modules (not being one), name -> why. Its graph calls them as modules, and they
    are planned as roots of their own, so that the root's own forward (which checkpoints when
    asked) keeps calling their graphs. Empty for any other root."""
    if not hooks_for(root).keeps_whole(root):
        return {}
    wanted = {id(m) for m in interesting}
    why = f"{type(root).__name__} is kept whole (it checkpoints its forward when asked): its children run graphs of their own"
    return {
        name: why
        for name, child in root.named_children()
        if id(child) not in wanted and any(id(m) in wanted for m in child.modules())
    }
