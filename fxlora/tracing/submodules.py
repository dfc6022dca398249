"""Looking up a module of a tree by its path, at the cost of a few dict lookups.

Graph nodes name modules by path (``blocks.3.attn.qkv``), and building the code of a graph looks
each one up several times (the tracer, every pass, lowering). ``nn.Module.get_submodule`` pays
``nn.Module.__getattr__``'s slow path twice per path component (about 9 µs per lookup on a timm
ViT, a sixth of its transform); `submodule` walks the ``_modules`` tables that those paths come
from (``named_modules``, as torch.fx names them), and leaves every other case, and every error
message, to ``get_submodule``.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["submodule"]


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
