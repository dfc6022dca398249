"""Looking up a module of a tree by its path, at the cost of a few dict lookups.

Graph nodes name modules by path (``blocks.3.attn.qkv``), and building the code of a graph looks
each one up several times (the tracer, every pass, lowering). ``nn.Module.get_submodule`` pays
``nn.Module.__getattr__``'s slow path twice per path component (about 9 µs per lookup on a timm
ViT, a sixth of its transform); `submodule` walks the ``_modules`` tables that those paths come
from (``named_modules``, as torch.fx names them), and leaves every other case, and every error
message, to ``get_submodule``. `named_submodules` lists ``named_modules()`` without a generator per
level of the tree (whose cost grows with depth: a third of computing a ViT's build state), and
while `trees_fixed` is entered walks each root's tree only once.
"""

from __future__ import annotations

from typing import ContextManager

import torch.nn as nn

from fxlora.tracing.memo import FixedAnswers

__all__ = ["submodule", "named_submodules", "trees_fixed", "BLOCK_CONTAINERS"]

#: the containers whose children are a model's repeated blocks
BLOCK_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` for a path of ``root.named_modules()``."""
    module = root
    if path:
        for name in path.split("."):
            table = module.__dict__.get("_modules")
            child = table.get(name) if type(table) is dict else None
            if child is None:  # not a registered child (an attribute, a hole, no such module), or another table
                return root.get_submodule(path)
            module = child
    return module


_NAMED_MODULES = nn.Module.named_modules


_TREES = FixedAnswers()


def trees_fixed() -> ContextManager[None]:
    """While entered, `named_submodules` on this thread walks each root's tree once and hands
    out that same list again: for work that adds, removes and replaces no module of the trees it
    asks about (planning a model's graph roots, building the code of installed forwards), which
    asks about each root's tree several times. The lists handed out are not to be changed."""
    return _TREES.fixed()


def named_submodules(root: nn.Module, closed: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """``list(root.named_modules())``: every module of the tree once, under its first path, in
    the same order. Walks the ``_modules`` tables itself, and leaves a tree with a module whose
    class lists its modules or compares itself its own way (``named_modules``, ``__hash__`` or
    ``__eq__`` of its own) to ``named_modules``. Inside `trees_fixed`, the list of an earlier
    call for `root` (not to be changed).

    `closed`: paths whose modules are listed but not walked into (what is inside them is left
    out, unless it is reachable outside them too); such a walk is short and never kept."""
    if closed:
        return _walk(root, frozenset(closed))
    return _TREES.answer((root,), lambda: _walk(root))


def _walk(root: nn.Module, closed: frozenset = frozenset()) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        cls, table = type(module), module.__dict__.get("_modules")
        if cls.named_modules is not _NAMED_MODULES or cls.__hash__ is not object.__hash__ or cls.__eq__ is not object.__eq__ or type(table) is not dict:
            below = tuple(c + "." for c in closed)
            return [(name, m) for name, m in root.named_modules() if not name.startswith(below)]
        seen.add(id(module))
        found.append((path, module))
        if path in closed:
            continue
        prefix = path + "." if path else ""
        stack.extend((prefix + name, child) for name, child in reversed(table.items()) if child is not None)
    return found
