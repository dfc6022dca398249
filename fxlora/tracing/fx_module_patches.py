"""torch.fx's two module patches, installed where they cost the least.

While it traces, torch.fx replaces ``nn.Module.__getattr__`` (so that reading a parameter or a
buffer gives a graph node) and ``nn.Module.__call__`` (so that a module call goes through
``Tracer.call_module``), and puts both back when the trace ends. Assigning a special method on a
class makes CPython update the slots of every subclass: with transformers, timm and peft loaded
(about 1600 ``nn.Module`` subclasses) the four assignments take about 1.6 ms, the largest part of
a small trace.

`scoped_module_patches` lends torch.fx, for one trace of a module, a patcher that installs
torch.fx's own two wrappers elsewhere, with the same effect on that trace:

- the ``__getattr__`` wrapper on each class of the traced module tree instead of on
  ``nn.Module`` (a few classes with few subclasses). torch.fx's wrapper changes a read only
  where it returns one of the root's own parameters or buffers; a module of another class is no
  module of the tree, and reaches such a tensor only if the same tensor is registered on it too
  (a module outside the model sharing its weight). Such a module called in the trace is refused
  as in torch.fx (`fxlora.tracing.tracer`: it holds tensors and is no submodule); one only read
  from gives the tensor itself, which any op turns into the same ``get_attr`` node;
- the ``__call__`` wrapper behind ``nn.Module._call_impl``, which every ``nn.Module.__call__``
  calls (an ordinary attribute: no slot update). The wrapper's own call of the module goes
  through ``nn.Module.__call__`` again; `_intercepting` hands that one inner call to the
  original ``_call_impl``.

It falls back to torch.fx's own patching (same trace, its usual cost) wherever the two are not
the same: a class of the tree with its own ``__getattr__`` or ``_call_impl``, a module compiled
on its own (``module.compile()``: its call skips ``_call_impl``), a trace inside another trace,
or a torch.fx without these internals.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

import torch.fx._symbolic_trace as _symbolic_trace
import torch.nn as nn

__all__ = ["scoped_module_patches", "scoped_classes"]

_ORIGINAL_GETATTR = nn.Module.__getattr__
_ORIGINAL_CALL = nn.Module.__call__
_ORIGINAL_CALL_IMPL = nn.Module._call_impl
_PATCHER = getattr(_symbolic_trace, "_Patcher", None)
_NEW_PATCHER = getattr(_symbolic_trace, "_new_patcher", None)
_SET_ATTR = getattr(_symbolic_trace, "_PatchedFnSetAttr", None)
_SUPPORTED = (
    None not in (_PATCHER, _NEW_PATCHER, _SET_ATTR)
    and hasattr(_symbolic_trace, "CURRENT_PATCHER")
    and getattr(_symbolic_trace, "_orig_module_getattr", None) is _ORIGINAL_GETATTR
    and getattr(_symbolic_trace, "_orig_module_call", None) is _ORIGINAL_CALL
)


def scoped_classes(root: Any) -> Optional[list[type]]:
    """The classes of `root`'s module tree, if its trace can take the scoped patches (see the
    module docstring); else None."""
    if not _SUPPORTED or not isinstance(root, nn.Module) or _symbolic_trace.CURRENT_PATCHER is not None:
        return None
    if nn.Module.__getattr__ is not _ORIGINAL_GETATTR or nn.Module.__call__ is not _ORIGINAL_CALL or nn.Module._call_impl is not _ORIGINAL_CALL_IMPL:
        return None  # someone else's patch is in place
    classes: dict[type, None] = {}
    for module in root.modules():
        if module._compiled_call_impl is not None:
            return None
        classes[type(module)] = None
    for cls in classes:
        if cls.__getattr__ is not _ORIGINAL_GETATTR or cls._call_impl is not _ORIGINAL_CALL_IMPL:
            return None
    return list(classes)


class _ClassAttribute(_SET_ATTR if _SET_ATTR is not None else object):  # type: ignore[misc]
    """torch.fx's record of one patch: ``new_fn`` as ``cls.<name>``; reverting puts back the
    class's own ``orig_fn``, or deletes the attribute where the class had none of its own (None)."""

    def revert(self) -> None:
        if self.orig_fn is None:
            delattr(self.frame_dict, self.fn_name)
        else:
            setattr(self.frame_dict, self.fn_name, self.orig_fn)

    def patch(self) -> None:
        setattr(self.frame_dict, self.fn_name, self.new_fn)


def _intercepting(wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """``nn.Module._call_impl`` while a scoped trace runs: a module call goes to torch.fx's
    ``__call__`` wrapper `wrapper`, except the one call of the same module that the wrapper makes
    to run it, which goes to the original ``_call_impl``. Kept per thread (other threads' calls
    pass through the wrapper too, as with torch.fx's own patch, and it lets them through)."""
    local = threading.local()

    def call_impl(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        entered = local.__dict__.setdefault("entered", [])
        if entered and entered[-1] is module:  # the wrapper running the module it intercepted
            entered[-1] = None  # a call of the module from its own forward is intercepted again
            return _ORIGINAL_CALL_IMPL(module, *args, **kwargs)
        entered.append(module)
        try:
            return wrapper(module, *args, **kwargs)
        finally:
            entered.pop()

    return call_impl


class _ScopedPatcher(_PATCHER if _PATCHER is not None else object):  # type: ignore[misc]
    """torch.fx's patcher, but for its two ``nn.Module`` patches (see the module docstring)."""

    def __init__(self, classes: list[type]) -> None:
        super().__init__()
        self.classes = classes

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True) -> None:
        if cls is not nn.Module or name not in ("__getattr__", "__call__"):
            return super().patch_method(cls, name, new_fn, deduplicate)
        new_fn.__fx_already_patched = deduplicate  # type: ignore[attr-defined]
        if name == "__getattr__":
            patches = [_ClassAttribute(c, name, c.__dict__.get(name), new_fn) for c in self.classes]
        else:
            patches = [_SET_ATTR(nn.Module, "_call_impl", _ORIGINAL_CALL_IMPL, _intercepting(new_fn))]
        for patch in patches:
            self.patches_made.append(patch)
            patch.patch()


@contextlib.contextmanager
def _scoped_patcher(classes: list[type]) -> Iterator[_ScopedPatcher]:
    """torch.fx's ``_new_patcher``, with a `_ScopedPatcher`."""
    prior = _symbolic_trace.CURRENT_PATCHER
    patcher = _symbolic_trace.CURRENT_PATCHER = _ScopedPatcher(classes)
    try:
        yield patcher
    finally:
        patcher.revert_all_patches()
        _symbolic_trace.CURRENT_PATCHER = prior


@contextlib.contextmanager
def scoped_module_patches(root: Any) -> Iterator[None]:
    """The next torch.fx trace started in the block (the trace of `root`) makes its module
    patches scoped (module docstring), where `scoped_classes` allows it; else the block changes
    nothing. Callers hold `fxlora.runtime.calls.CALL_LOCK` (fxlora's traces never overlap)."""
    classes = scoped_classes(root)
    if classes is None:
        yield
        return

    def lend_once() -> Any:
        _symbolic_trace._new_patcher = _NEW_PATCHER  # one trace only: a trace inside it patches as usual
        return _scoped_patcher(classes)

    _symbolic_trace._new_patcher = lend_once
    try:
        yield
    finally:
        if _symbolic_trace._new_patcher is lend_once:
            _symbolic_trace._new_patcher = _NEW_PATCHER
