"""The Hugging Face ``kernels`` package's forward wrapper, as transformers 5 applies it.

With ``kernels`` installed (transformers 5 depends on it), ``@use_kernelized_func(fn)`` on an
attention class (Llama's and most others with rotary embeddings) wraps ``forward``: the wrapper
routes calls of the global function ``fn`` (a ``Func`` module made by
``use_kernel_forward_from_hub``) to the module's private copy ``module._kernel_funcs[name]``
while ``forward`` runs, so that ``kernelize`` can swap a hub kernel into that copy.

While no private copy has been kernelized (none has a ``forward`` of its own) and none has hooks,
the copy runs the plain function: the wrapper then calls ``forward`` with the call's arguments
unchanged, and a graph traced through the wrapped ``forward`` (where ``fn`` runs the plain function
too) computes exactly what the call computes (`unwrap_kernelized_func`). The graph never reads the
copies: identical blocks share one trace although each holds copies of its own, the fingerprint
holding only whether each copy is plain (`plain_copies`). A module with a kernelized
copy does not trace (it runs eagerly, with its kernel). ``kernelize`` after ``fxlora.transform``
is not seen by the graphs already traced: they keep the plain function (the same math).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

from fxlora.tracing.integrations import TraceHooks

__all__ = ["plain_copies", "unwrap_kernelized_func", "trace_hooks"]


def _kernelized_forward_code():
    """The code object of ``use_kernelized_func``'s forward wrapper, or None without ``kernels``."""
    try:
        from kernels import use_kernel_forward_from_hub, use_kernelized_func
    except ImportError:
        return None

    @use_kernel_forward_from_hub("FxloraProbe")
    def probe(x):
        return x

    @use_kernelized_func(probe)
    class _Layer(nn.Module):
        def forward(self, x):
            return x

    return getattr(_Layer.forward, "__code__", None)


_CODE = _kernelized_forward_code()


def _plain_copy(wrapper: object) -> bool:
    """`wrapper` (a private ``Func`` copy) runs its class's forward, with no hooks."""
    if not isinstance(wrapper, nn.Module) or "forward" in wrapper.__dict__:
        return False
    return not (wrapper._forward_hooks or wrapper._forward_pre_hooks or wrapper._backward_hooks)


def plain_copies(copies: object) -> object:
    """What a trace depends on in a module's ``_kernel_funcs``: which of its copies are plain."""
    if not isinstance(copies, dict):
        return id(copies)
    return tuple(sorted((str(name), _plain_copy(w)) for name, w in copies.items()))


def unwrap_kernelized_func(fn: Callable, module: Optional[nn.Module] = None) -> Optional[tuple[Callable, frozenset[str]]]:
    """``(wrapped forward, {})`` when `fn` is ``use_kernelized_func``'s wrapper and every private
    copy of `module` runs the plain function (see the module docstring); else None."""
    if _CODE is None or getattr(fn, "__code__", None) is not _CODE or module is None:
        return None
    copies = module.__dict__.get("_kernel_funcs")
    if not isinstance(copies, dict) or not all(plain for _, plain in plain_copies(copies)):
        return None
    return fn.__wrapped__, frozenset()


def trace_hooks() -> TraceHooks:
    """Looked up for any model holding a module that ``use_kernelized_func`` decorated
    (`fxlora.tracing.integrations.MARKERS`), whatever package its class is in."""
    return TraceHooks(unwrappers=(unwrap_kernelized_func,), attribute_summaries=(("_kernel_funcs", plain_copies),))
