"""Looking up a module of a tree by its path, at the cost of a few dict lookups.

Graph nodes name modules by path (``blocks.3.attn.qkv``), and building the code of a graph looks
each one up several times (the tracer, every pass, lowering). ``nn.Module.get_submodule`` pays
``nn.Module.__getattr__``'s slow path twice per path component (about 9 µs per lookup on a timm
ViT, a sixth of its transform); `submodule` walks the ``_modules`` tables that those paths come
from (``named_modules``, as torch.fx names them), and leaves every other case, and every error
message, to ``get_submodule``. `named_submodules` lists ``named_modules()`` without a generator per
level of the tree (whose cost grows with depth: a third of computing a ViT's build state).
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["submodule", "named_submodules", "BLOCK_CONTAINERS"]

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


def named_submodules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(root.named_modules())``: every module of the tree once, under its first path, in
    the same order. Walks the ``_modules`` tables itself, and leaves a tree with a module whose
    class lists its modules or compares itself its own way (``named_modules``, ``__hash__`` or
    ``__eq__`` of its own) to ``named_modules``."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        cls, table = type(module), module.__dict__.get("_modules")
        if cls.named_modules is not _NAMED_MODULES or cls.__hash__ is not object.__hash__ or cls.__eq__ is not object.__eq__ or type(table) is not dict:
            return list(root.named_modules())
        seen.add(id(module))
        found.append((path, module))
        prefix = path + "." if path else ""
        stack.extend((prefix + name, child) for name, child in reversed(table.items()) if child is not None)
    return found
