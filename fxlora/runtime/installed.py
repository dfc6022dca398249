"""Where fxlora's forwards live: the instance attribute ``forward`` of the user's modules.

Each kind of forward fxlora installs registers its class here (`installs`): the graph roots'
(`fxlora.runtime.forwards.GraphForward`) and the adapted layers' and `modules_to_save` modules'
(`fxlora.runtime.layer_forwards`). `installed_forward` finds any of them on a module, and
`uninstall` gives the module back the forward it had before.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Optional, TypeVar

import torch.nn as nn

__all__ = ["installs", "installed_forward", "install", "uninstall", "track", "live_roots"]

T = TypeVar("T", bound=type)

#: the classes of the forwards fxlora installs (`installs`)
_KINDS: tuple[type, ...] = ()


def installs(cls: T) -> T:
    """Class decorator: instances of `cls` are forwards fxlora installs (`installed_forward`
    finds them). Each needs a ``previous`` attribute: the instance forward it replaced, or None."""
    global _KINDS
    _KINDS = (*_KINDS, cls)
    return cls


def installed_forward(module: nn.Module) -> Optional[Any]:
    """The fxlora forward installed on `module`, if any."""
    fwd = module.__dict__.get("forward")
    return fwd if isinstance(fwd, _KINDS) else None


def install(module: nn.Module, forward: Any) -> None:
    module.__dict__["forward"] = forward


def uninstall(module: nn.Module) -> None:
    """Give `module` back the forward it had before fxlora."""
    fwd = installed_forward(module)
    if fwd is not None and fwd.previous is not None:
        module.__dict__["forward"] = fwd.previous
    elif fwd is not None:
        del module.__dict__["forward"]


#: every live graph root's forward (`track`), and the lock of that set (a root may be made or
#: unpickled in one thread while another looks for roots)
_ROOTS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_ROOTS_LOCK = threading.Lock()


def track(forward: Any) -> None:
    """Let `live_roots` find `forward` (a graph root's, when made or unpickled)."""
    with _ROOTS_LOCK:
        _ROOTS.add(forward)


def live_roots(cls: type, owner: Optional[Any] = None) -> list[Any]:
    """The live graph roots' forwards whose root is of class `cls` (of `owner`'s model only,
    when given)."""
    with _ROOTS_LOCK:
        roots = list(_ROOTS)
    return [f for f in roots if type(f.root) is cls and (owner is None or f.owner is owner)]
