"""transformers model code that branches on sizes through Python builtins, kept exact.

MPT's attention computes ``max(0, position_bias.size(1) - query_length)``: with a traced size
Python's ``max`` has to compare a proxy, which fails. While fxlora traces, the builtins named in
`TRACED_BUILTINS` are shadowed in those model modules by versions that record one
``call_function`` node of the builtin itself when an argument is traced (so the graph computes
the same ``max`` of the same real ints) and call it directly otherwise. Nothing else changes:
the shadowing names are removed again when tracing ends.
"""

from __future__ import annotations

import builtins
import contextlib
import sys
from typing import Any, Callable, Iterator

from fxlora.tracing.integrations import opaque

__all__ = ["TRACED_BUILTINS", "traced_builtins"]

#: model module -> builtins whose calls on traced sizes become nodes
TRACED_BUILTINS: dict[str, tuple[str, ...]] = {
    "transformers.models.mpt.modeling_mpt": ("max",),
}

_OPAQUE: dict[str, Callable] = {}


def _opaque_builtin(name: str) -> Callable[..., Any]:
    if name not in _OPAQUE:
        _OPAQUE[name] = opaque(getattr(builtins, name))
    return _OPAQUE[name]


@contextlib.contextmanager
def traced_builtins() -> Iterator[None]:
    """While active, `TRACED_BUILTINS` are shadowed in their (already imported) modules."""
    shadowed: list[tuple[dict, str]] = []
    try:
        for module_name, names in TRACED_BUILTINS.items():
            module = sys.modules.get(module_name)
            if module is None:
                continue
            for name in names:
                if name not in module.__dict__:
                    module.__dict__[name] = _opaque_builtin(name)
                    shadowed.append((module.__dict__, name))
        yield
    finally:
        for namespace, name in shadowed:
            namespace.pop(name, None)
